/* memstat.h - the process's resident memory as the kernel counts it, for
 * `run --memory-report`: what moec --explain predicts is checked against
 * this, not against our own bookkeeping (docs/memory.md). */
#ifndef MOEC_MEMSTAT_H
#define MOEC_MEMSTAT_H

#include <stdint.h>

typedef struct memstat {
    uint64_t resident;   /* VmRSS: bytes resident now */
    uint64_t peak;       /* VmHWM: the most resident so far */
} memstat;

/* Reads /proc/self/status; 0, or -1 where it cannot (not Linux). */
int memstat_read(memstat *m);

#endif
