/* data.c - mmap the data file; validate its format before the first step. */
#include "data.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define LLMC_HEADER_BYTES ((uint64_t)256 * 4)

__attribute__((format(printf, 3, 4)))
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

int data_open(data_file *d, const char *path, uint32_t format, double val_fraction, char *err,
              size_t errlen)
{
    memset(d, 0, sizeof *d);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail(err, errlen, "%s: cannot open data file: %s; check the path or pass "
                    "--data FILE", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size == 0) {
        close(fd);
        return fail(err, errlen, "%s: data file is empty or not a regular file; give a text "
                    "file or an llm.c .bin shard", path);
    }
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED)
        return fail(err, errlen, "%s: cannot map data file: %s", path, strerror(errno));
    d->map = m;
    d->map_bytes = (size_t)st.st_size;
    const uint8_t *b = m;
    uint64_t n = (uint64_t)st.st_size;
    if (format == DATA_BYTES) {
        d->tokens = b;
        d->width = 1;
        d->ntok = n;
    } else if (format == DATA_LLMC_U16 || format == DATA_LLMC_U32) {
        int32_t h[3];
        if (n < LLMC_HEADER_BYTES) {
            data_close(d);
            return fail(err, errlen, "%s: too short for an llm.c shard (%llu bytes, the header "
                        "is %llu); regenerate the shard", path, (unsigned long long)n,
                        (unsigned long long)LLMC_HEADER_BYTES);
        }
        memcpy(h, b, sizeof h);
        int32_t want_magic = format == DATA_LLMC_U16 ? 20240520 : 20240801;
        int32_t want_version = format == DATA_LLMC_U16 ? 1 : 7;
        if (h[0] != want_magic) {
            const char *hint = h[0] == 20240520 || h[0] == 20240801
                ? "the shard has the other token width; set the data format in train { } to "
                  "match" : "is this an llm.c token shard?";
            data_close(d);
            return fail(err, errlen, "%s: bad llm.c magic %d (expected %d); %s", path, h[0],
                        want_magic, hint);
        }
        if (h[1] != want_version) {
            data_close(d);
            return fail(err, errlen, "%s: llm.c shard version %d (expected %d for magic %d); "
                        "regenerate the shard", path, h[1], want_version, want_magic);
        }
        d->width = format == DATA_LLMC_U16 ? 2 : 4;
        uint64_t have = (n - LLMC_HEADER_BYTES) / (uint64_t)d->width;
        if (h[2] < 0 || (uint64_t)h[2] != have || (n - LLMC_HEADER_BYTES) % (uint64_t)d->width) {
            data_close(d);
            return fail(err, errlen, "%s: header says %d tokens but the file holds %llu bytes "
                        "of tokens (%d bytes each); the shard is truncated or corrupt", path,
                        h[2], (unsigned long long)(n - LLMC_HEADER_BYTES), d->width);
        }
        d->tokens = b + LLMC_HEADER_BYTES;
        d->ntok = have;
    } else {
        data_close(d);
        return fail(err, errlen, "%s: unknown data format %u; recompile the model", path, format);
    }
    uint64_t nval = (uint64_t)((double)d->ntok * val_fraction);
    d->split[DATA_TRAIN][0] = 0;
    d->split[DATA_TRAIN][1] = d->ntok - nval;
    d->split[DATA_VAL][0] = d->ntok - nval;
    d->split[DATA_VAL][1] = d->ntok;
    return 0;
}

uint32_t data_token(const data_file *d, uint64_t i)
{
    const uint8_t *p = d->tokens + i * (uint64_t)d->width;
    if (d->width == 1)
        return p[0];
    if (d->width == 2)
        return (uint32_t)p[0] | (uint32_t)p[1] << 8;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int data_has_split(const data_file *d, int split, int64_t T)
{
    return d->split[split][1] - d->split[split][0] >= (uint64_t)T + 1;
}

int data_batch(const data_file *d, int split, rng *r, int64_t B, int64_t T, int64_t vocab,
               int32_t *tokens, int32_t *targets, char *err, size_t errlen)
{
    return data_batch_shard(d, split, r, B, T, vocab, 0, 1, tokens, targets, err, errlen);
}

/* Every shard draws all nshards x B offsets, in the same order, and keeps
 * rows [shard*B, (shard+1)*B): the shards of one call are disjoint and
 * together are exactly the batch one rank would draw with nshards x B rows,
 * and the generator ends in the same state on every rank. */
int data_batch_shard(const data_file *d, int split, rng *r, int64_t B, int64_t T, int64_t vocab,
                     int64_t shard, int64_t nshards, int32_t *tokens, int32_t *targets,
                     char *err, size_t errlen)
{
    uint64_t begin = d->split[split][0], end = d->split[split][1];
    if (!data_has_split(d, split, T))
        return fail(err, errlen, "the %s split has %llu tokens, fewer than seq + 1 = %lld; use "
                    "a bigger data file%s", split == DATA_TRAIN ? "training" : "validation",
                    (unsigned long long)(end - begin), (long long)T + 1,
                    split == DATA_VAL ? " or a larger val_fraction" : "");
    uint64_t span = end - begin - (uint64_t)T;   /* valid start offsets */
    for (int64_t row = 0; row < nshards * B; row++) {
        uint64_t at = begin + rng_below(r, span);
        if (row / B != shard)
            continue;
        int64_t b = row - shard * B;
        for (int64_t t = 0; t <= T; t++) {
            uint32_t tok = data_token(d, at + (uint64_t)t);
            if ((int64_t)tok >= vocab)
                return fail(err, errlen, "token %u at position %llu is >= the model's vocab "
                            "%lld; use data made for this vocabulary", tok,
                            (unsigned long long)(at + (uint64_t)t), (long long)vocab);
            if (t < T)
                tokens[b * T + t] = (int32_t)tok;
            if (t > 0)
                targets[b * T + t - 1] = (int32_t)tok;
        }
    }
    return 0;
}

void data_close(data_file *d)
{
    if (d->map)
        munmap(d->map, d->map_bytes);
    memset(d, 0, sizeof *d);
}
