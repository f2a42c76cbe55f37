/* sample_host.c: a tiny JIT host on liboptpoline.so. It JITs a few functions into engine memory, calls
 * them through inline and outline sites from several threads while the distribution of targets
 * changes, checks every result, toggles promotion through the config file while the threads run, and
 * checks the C ABI's error handling. Exit status 0 only if every call was right and every check held.
 *
 *   gcc -std=c99 -O2 -Wall -Wextra -I DIR sample_host.c -L DIR -loptpoline -Wl,-rpath,DIR -lpthread
 *   ./a.out CONFIG_PATH
 */
#define _POSIX_C_SOURCE 200809L
#include "optpoline.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TARGETS 6
#define SITES 16
#define THREADS 4

#define CHECK(call)                                                                              \
    do {                                                                                         \
        int rc_ = (call);                                                                        \
        if (rc_ != OPT_OK) {                                                                     \
            fprintf(stderr, "%s:%d: %s failed: %d %s\n", __FILE__, __LINE__, #call, rc_, opt_last_error()); \
            exit(2);                                                                             \
        }                                                                                        \
    } while (0)

typedef uint64_t (*caller_fn)(const void *target);

static opt_engine *engine;
static const void *targets[TARGETS];
static caller_fn callers[2][SITES];     /* [0]: inline sites, [1]: outline sites */
static opt_site *sites[2][SITES];
static atomic_int phase;                /* 0: mono (target 0), 1: bimorphic (1 and 2), 2: mono (target 3) */
static atomic_int stop;
static atomic_long calls, wrong;
static int failures;

static void expect(int condition, const char *what)
{
    printf("%s: %s\n", condition ? "ok" : "FAILED", what);
    if (!condition) failures++;
}

static void sleep_ms(long ms)
{
    struct timespec t = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&t, &t) != 0) { /* a thread flush may interrupt the sleep */ }
}

static void write_config(const char *path, const char *text)
{
    char temporary[4096];
    snprintf(temporary, sizeof temporary, "%s.tmp", path);
    FILE *file = fopen(temporary, "w");
    if (!file || fputs(text, file) < 0 || fclose(file) != 0 || rename(temporary, path) != 0) {
        perror(path);
        exit(2);
    }
}

static void *emit(size_t size, void **rw)
{
    void *rx;
    CHECK(opt_code_alloc(engine, size, &rx, rw));
    return rx;
}

static void jit(void)
{
    /* Targets: mov eax, 100 + i; ret (16 bytes apart). */
    void *rw;
    uint8_t *rx = emit(16 * TARGETS, &rw);
    for (int i = 0; i < TARGETS; i++) {
        uint8_t *w = (uint8_t *)rw + 16 * i;
        uint32_t id = 100 + i;
        w[0] = 0xB8;
        memcpy(w + 1, &id, 4);
        w[5] = 0xC3;
        targets[i] = rx + 16 * i;
    }
    CHECK(opt_code_publish(engine, rx, "host_targets"));

    for (int s = 0; s < SITES; s++) {
        char name[64];

        /* Inline: mov rax, rdi; <site on rax>; ret */
        uint8_t *w;
        uint8_t *code = emit(64, &rw);
        w = rw;
        w[0] = 0x48; w[1] = 0x89; w[2] = 0xF8;
        size_t length = 0;
        snprintf(name, sizeof name, "inline_site%d", s);
        CHECK(opt_site_emit(engine, name, 0, w + 3, code + 3, 64 - 4, &length, &sites[0][s]));
        w[3 + length] = 0xC3;
        snprintf(name, sizeof name, "inline_caller%d", s);
        CHECK(opt_code_publish(engine, code, name));
        callers[0][s] = (caller_fn)(uintptr_t)code;

        /* Outline: mov rax, rdi; call entry; ret */
        void *entry;
        snprintf(name, sizeof name, "outline_site%d", s);
        CHECK(opt_site_create(engine, name, 0, &sites[1][s], &entry));
        code = emit(16, &rw);
        w = rw;
        w[0] = 0x48; w[1] = 0x89; w[2] = 0xF8;
        int64_t rel = (int64_t)((uint8_t *)entry - (code + 8));
        if (rel < INT32_MIN || rel > INT32_MAX) {
            fprintf(stderr, "the outline entry is out of rel32 reach\n");
            exit(2);
        }
        int32_t rel32 = (int32_t)rel;
        w[3] = 0xE8;
        memcpy(w + 4, &rel32, 4);
        w[8] = 0xC3;
        snprintf(name, sizeof name, "outline_caller%d", s);
        CHECK(opt_code_publish(engine, code, name));
        callers[1][s] = (caller_fn)(uintptr_t)code;
    }
}

static void *run(void *argument)
{
    uint64_t x = 0x9E3779B97F4A7C15ull * (uintptr_t)argument + 1;
    long local = 0, bad = 0;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        int p = atomic_load_explicit(&phase, memory_order_relaxed);
        for (int s = 0; s < SITES; s++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            int t = p == 0 ? 0 : p == 1 ? 1 + (int)(x & 1) : 3;
            for (int kind = 0; kind < 2; kind++) {
                if (callers[kind][s](targets[t]) != (uint64_t)(100 + t)) bad++;
                local++;
            }
        }
        if (local >= 4096) {
            atomic_fetch_add(&calls, local);
            atomic_fetch_add(&wrong, bad);
            local = bad = 0;
        }
    }
    atomic_fetch_add(&calls, local);
    atomic_fetch_add(&wrong, bad);
    return NULL;
}

/* Sites (of both kinds) whose hottest promoted targets are `want`, in any order (count 0: on the
 * fallback). A target the learner promoted earlier may remain after them: a promoted site's hits are
 * not sampled, so it only goes at the next periodic relearn, and it costs a compare that never runs. */
static int sites_promoted_to(const void *const *want, uint32_t count)
{
    int n = 0;
    for (int kind = 0; kind < 2; kind++) {
        for (int s = 0; s < SITES; s++) {
            opt_site_stats stats;
            CHECK(opt_site_get_stats(engine, sites[kind][s], &stats));
            int same = count == 0 ? stats.target_count == 0 : stats.target_count >= count;
            for (uint32_t i = 0; same && i < count; i++) {
                int found = 0;
                for (uint32_t j = 0; j < count; j++) found |= stats.targets[j] == want[i];
                same = found;
            }
            n += same;
        }
    }
    return n;
}

static int wait_for(const void *const *want, uint32_t count, long ms)
{
    for (long waited = 0; waited < ms; waited += 20) {
        if (sites_promoted_to(want, count) == 2 * SITES) return 1;
        sleep_ms(20);
    }

    /* Say where it stands, for the log. */
    printf("  %d of %d sites as wanted; ", sites_promoted_to(want, count), 2 * SITES);
    for (int kind = 0; kind < 2; kind++) {
        opt_site_stats stats;
        CHECK(opt_site_get_stats(engine, sites[kind][0], &stats));
        printf("%s site 0: samples=%llu patches=%llu targets=", kind ? "outline" : "inline", (unsigned long long)stats.samples, (unsigned long long)stats.patches);
        for (uint32_t i = 0; i < stats.target_count; i++) {
            for (int t = 0; t < TARGETS; t++) {
                if (stats.targets[i] == targets[t]) printf("%d ", t);
            }
        }
        printf(kind ? "\n" : "; ");
    }
    return 0;
}

static void error_handling(void)
{
    opt_site_stats stats;
    expect(opt_site_get_stats(engine, (opt_site *)(uintptr_t)0xdeadbeef, &stats) == OPT_ERR_ARG && strlen(opt_last_error()) > 0,
           "a foreign site handle is refused with OPT_ERR_ARG and a message");
    expect(opt_site_promote(engine, NULL, targets, 1) == OPT_ERR_ARG, "a NULL site is refused");
    expect(opt_engine_destroy((opt_engine *)(uintptr_t)0x1) == OPT_ERR_ARG, "a foreign engine handle is refused");
    expect(opt_site_create(engine, "bad_register", 4, &(opt_site *){0}, &(void *){0}) == OPT_ERR_ARG, "rsp is not a site register");
    void *rw;
    uint8_t *rx = emit(64, &rw);
    size_t length = 0;
    opt_site *site = NULL;
    expect(opt_site_emit(engine, "too_small", 0, rw, rx, 3, &length, &site) == OPT_ERR_ARG && length > 3 && site == NULL,
           "a buffer too small is refused and the size needed reported");
    expect(opt_site_emit(engine, "wrong_rw", 0, (uint8_t *)rw + 1, rx, 64, &length, &site) == OPT_ERR_ARG, "rw must match rx");
    const void *far_away = (const void *)(uintptr_t)0x10000;
    expect(opt_site_promote(engine, sites[0][0], &far_away, 1) == OPT_ERR_REACH, "a target out of rel32 reach is refused");
    CHECK(opt_code_free(engine, rx));
    expect(opt_code_free(engine, rx) == OPT_ERR_ARG, "a double free is refused");
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s CONFIG_PATH\n", argv[0]);
        return 2;
    }
    const char *config = argv[1];
    const char *learn = "{ \"learning\": { \"epochMilliseconds\": 20 }, \"promotion\": { \"inlineSlots\": 2 } }\n";
    const char *off = "{ \"learning\": { \"epochMilliseconds\": 20 }, \"promotion\": { \"enabled\": false, \"inlineSlots\": 2 } }\n";
    write_config(config, learn);
    CHECK(opt_engine_create(config, &engine));
    jit();

    pthread_t threads[THREADS];
    for (intptr_t i = 0; i < THREADS; i++) pthread_create(&threads[i], NULL, run, (void *)i);

    expect(wait_for(&targets[0], 1, 5000), "phase mono: every site learns target 0");
    atomic_store(&phase, 1);
    expect(wait_for(&targets[1], 2, 5000), "phase bimorphic: every site learns targets 1 and 2");

    write_config(config, off);
    CHECK(opt_reload_config(engine));
    expect(wait_for(NULL, 0, 5000), "promotion.enabled = false: every site is back on the fallback");

    write_config(config, "{ \"promotion\": { \"enabled\": true,, } }\n");
    int rc = opt_reload_config(engine);
    expect(rc == OPT_ERR_CONFIG && strstr(opt_last_error(), ":1:") != NULL, "an invalid file is refused with its line and column");
    printf("  (%s)\n", opt_last_error());
    sleep_ms(100);
    expect(sites_promoted_to(NULL, 0) == 2 * SITES, "the last good config (promotion off) stays in force");

    write_config(config, learn);
    CHECK(opt_reload_config(engine));
    atomic_store(&phase, 2);
    expect(wait_for(&targets[3], 1, 5000), "promotion back on, phase mono: every site learns target 3");

    char profile[4096];
    snprintf(profile, sizeof profile, "%s.profile", config);
    CHECK(opt_save_profile(engine, profile));
    expect(opt_load_profile(engine, "/nonexistent/optpoline.profile") == OPT_ERR_PROFILE, "a missing profile is refused");
    printf("  (%s)\n", opt_last_error());
    CHECK(opt_load_profile(engine, profile));
    remove(profile);

    CHECK(opt_set_promotion(engine, 0));
    expect(sites_promoted_to(NULL, 0) == 2 * SITES, "opt_set_promotion(0) demotes every site");
    expect(opt_site_promote(engine, sites[0][0], &targets[0], 1) == OPT_ERR_STATE, "and refuses explicit promotions");
    CHECK(opt_set_promotion(engine, 1));
    CHECK(opt_suspend_patching(engine, 1));
    expect(opt_site_promote(engine, sites[0][0], &targets[0], 1) == OPT_ERR_STATE, "suspended patching refuses changes");
    CHECK(opt_suspend_patching(engine, 0));
    const void *two[2] = { targets[4], targets[5] };
    CHECK(opt_site_promote(engine, sites[1][0], two, 2));

    error_handling();

    atomic_store(&stop, 1);
    for (int i = 0; i < THREADS; i++) pthread_join(threads[i], NULL);
    opt_site_stats stats;
    CHECK(opt_site_get_stats(engine, sites[0][0], &stats));
    printf("site inline_site0: samples=%llu patches=%llu targets=%u\n", (unsigned long long)stats.samples, (unsigned long long)stats.patches, stats.target_count);
    CHECK(opt_engine_destroy(engine));
    expect(opt_reload_config(engine) == OPT_ERR_ARG, "a destroyed engine is refused");

    long c = atomic_load(&calls), w = atomic_load(&wrong);
    printf("calls=%ld wrong=%ld failures=%d\n", c, w, failures);
    return c > 0 && w == 0 && failures == 0 ? 0 : 1;
}
