/* The training run for gcc's profile-guided build of peers.c: runs peer_loop over the benchmark's own
 * tables, read from the file the benchmark wrote (the same sequence it times).
 * File: uint32 phase count, uint32 rounds, uint64 calls per phase, then per phase 4096 uint8 target
 * indices. Each round runs every phase in turn, like the benchmark's invocation. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define PEER_TABLE_LENGTH 4096
#define PEER_TARGETS 64

int peer_targets(void **out, int count);
uint64_t peer_loop(uint64_t n, uint64_t (*const *table)(uint64_t));

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s TABLES\n", argv[0]);
        return 2;
    }

    FILE *file = fopen(argv[1], "rb");
    if (!file) {
        perror(argv[1]);
        return 1;
    }

    uint32_t phases, rounds;
    uint64_t calls;
    if (fread(&phases, 4, 1, file) != 1 || fread(&rounds, 4, 1, file) != 1 || fread(&calls, 8, 1, file) != 1 ||
        phases == 0 || phases > 16) {
        fprintf(stderr, "%s: not a table file\n", argv[1]);
        return 1;
    }

    void *targets[PEER_TARGETS];
    peer_targets(targets, PEER_TARGETS);
    uint64_t (**tables)(uint64_t) = malloc(sizeof(void *) * PEER_TABLE_LENGTH * phases);
    for (uint32_t p = 0; p < phases; p++) {
        uint8_t index[PEER_TABLE_LENGTH];
        if (fread(index, 1, PEER_TABLE_LENGTH, file) != PEER_TABLE_LENGTH) {
            fprintf(stderr, "%s: truncated\n", argv[1]);
            return 1;
        }

        for (int i = 0; i < PEER_TABLE_LENGTH; i++) {
            if (index[i] >= PEER_TARGETS) {
                fprintf(stderr, "%s: target index %u out of range\n", argv[1], index[i]);
                return 1;
            }

            tables[(p * PEER_TABLE_LENGTH) + i] = (uint64_t (*)(uint64_t))targets[index[i]];
        }
    }

    fclose(file);
    uint64_t total = 0;
    for (uint32_t r = 0; r < rounds; r++)
        for (uint32_t p = 0; p < phases; p++)
            total += peer_loop(calls, tables + (p * PEER_TABLE_LENGTH));

    free(tables);
    if (total != (uint64_t)rounds * phases * calls) {
        fprintf(stderr, "training ran %llu calls, not %llu\n", (unsigned long long)total, (unsigned long long)rounds * phases * calls);
        return 1;
    }

    return 0;
}
