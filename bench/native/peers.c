/* The C peers of the Peers benchmark: the same loop as the engine's loop kernels (load the next
 * target of a 4096-entry table, call it, repeat), compiled by gcc three ways by peers.sh: plain -O2,
 * -O2 with retpolines (-mindirect-branch=thunk), and -O2 with gcc's profile-guided indirect-call
 * promotion (-fprofile-generate, a training run of train.c on the same table, -fprofile-use).
 *
 * The loop chains the calls (acc = table[i](acc)) and returns acc, which is n when every call ran.
 * The targets are 64 distinct functions x + 1 (lea 1(%rdi),%rax; ret), like the engine's. noinline
 * keeps gcc from inlining a promoted target, so every peer pays for a real call; const is what lets
 * gcc keep its promotion anyway (it drops a speculative call that neither inlines nor calls a
 * const or pure function); -fno-ipa-icf (peers.sh) keeps it from folding the identical targets. */
#include <stdint.h>

#define PEER_TABLE_LENGTH 4096
#define PEER_TARGETS 64

#define T(k) __attribute__((noinline, noclone, const, aligned(64))) static uint64_t peer_t##k(uint64_t x) { return x + 1; }
#define T8(k) T(k##0) T(k##1) T(k##2) T(k##3) T(k##4) T(k##5) T(k##6) T(k##7)
T8(0) T8(1) T8(2) T8(3) T8(4) T8(5) T8(6) T8(7)

#define P(k) peer_t##k,
#define P8(k) P(k##0) P(k##1) P(k##2) P(k##3) P(k##4) P(k##5) P(k##6) P(k##7)
static uint64_t (*const targets[PEER_TARGETS])(uint64_t) = { P8(0) P8(1) P8(2) P8(3) P8(4) P8(5) P8(6) P8(7) };

/* Writes the address of target i to out[i], for i < count (at most PEER_TARGETS); returns how many. */
int peer_targets(void **out, int count)
{
    int n = count < PEER_TARGETS ? count : PEER_TARGETS;
    for (int i = 0; i < n; i++)
        out[i] = (void *)targets[i];
    return n;
}

/* n chained calls through table[i % 4096]: the loop every peer runs; returns n when all ran. */
__attribute__((aligned(64))) uint64_t peer_loop(uint64_t n, uint64_t (*const *table)(uint64_t))
{
    uint64_t acc = 0;
    for (uint64_t i = 0; i < n; i++)
        acc = table[i & (PEER_TABLE_LENGTH - 1)](acc);
    return acc;
}
