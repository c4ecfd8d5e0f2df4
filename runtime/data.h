/* data.h - training data: a byte-level text file or an llm.c token shard,
 * mapped read-only and validated on open; batches drawn at random offsets
 * from a seeded generator. */
#ifndef MOEC_DATA_H
#define MOEC_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "rng.h"

enum { DATA_BYTES = 0, DATA_LLMC_U16 = 1, DATA_LLMC_U32 = 2 };
enum { DATA_TRAIN = 0, DATA_VAL = 1 };

typedef struct data_file {
    void *map;
    size_t map_bytes;
    const uint8_t *tokens;      /* first token */
    int width;                  /* bytes per token: 1, 2 or 4 */
    uint64_t ntok;
    uint64_t split[2][2];       /* [train|val] = [begin, end) token index */
} data_file;

/* format: DATA_*; the last val_fraction of the tokens is the validation split. */
int data_open(data_file *d, const char *path, uint32_t format, double val_fraction, char *err,
              size_t errlen);
uint32_t data_token(const data_file *d, uint64_t i);
/* B rows of T tokens (and the T next tokens as targets) from split, each at a
 * random offset; a token >= vocab is an error. */
int data_batch(const data_file *d, int split, rng *r, int64_t B, int64_t T, int64_t vocab,
               int32_t *tokens, int32_t *targets, char *err, size_t errlen);
/* Data parallelism: shard (0-based) of nshards takes its B rows of the
 * nshards x B rows drawn; nshards = 1 is data_batch. */
int data_batch_shard(const data_file *d, int split, rng *r, int64_t B, int64_t T, int64_t vocab,
                     int64_t shard, int64_t nshards, int32_t *tokens, int32_t *targets,
                     char *err, size_t errlen);
int data_has_split(const data_file *d, int split, int64_t T);
void data_close(data_file *d);

#endif
