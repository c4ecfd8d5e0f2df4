/* memstat.c - VmRSS and VmHWM of /proc/self/status (memstat.h). */
#include <stdio.h>
#include <string.h>

#include "memstat.h"

int memstat_read(memstat *m)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return -1;
    char line[256];
    unsigned long long kb;
    int found = 0;
    memset(m, 0, sizeof *m);
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "VmRSS: %llu kB", &kb) == 1) {
            m->resident = (uint64_t)kb << 10;
            found |= 1;
        } else if (sscanf(line, "VmHWM: %llu kB", &kb) == 1) {
            m->peak = (uint64_t)kb << 10;
            found |= 2;
        }
    }
    fclose(f);
    return found == 3 ? 0 : -1;
}
