/* optpoline.h: the C ABI of the Optpoline engine (liboptpoline.so, x86-64 Linux). C99, self-contained.
 *
 * Every function is thread safe, returns OPT_OK (0) or a negative OPT_ERR_* code, and then leaves a
 * message for opt_last_error() on the calling thread. Handles that the library did not hand out (or
 * that were destroyed) are detected and refused with OPT_ERR_ARG; code is never left half-written.
 *
 * Build a host: gcc host.c -I DIR -L DIR -loptpoline -Wl,-rpath,DIR -lpthread
 */
#ifndef OPTPOLINE_H
#define OPTPOLINE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct opt_engine opt_engine;
typedef struct opt_site opt_site;

enum {
    OPT_OK = 0,
    OPT_ERR_ARG = -1,      /* a NULL, foreign or out-of-range argument */
    OPT_ERR_STATE = -2,    /* not now: promotion off, site excluded, patching suspended, engine busy or destroyed */
    OPT_ERR_NOMEM = -3,    /* no code memory within reach (or no memory at all) */
    OPT_ERR_CONFIG = -4,   /* the config file is invalid; the message says PATH:LINE:COLUMN: what */
    OPT_ERR_REACH = -5,    /* a target is out of direct-call reach of the site; nothing changed */
    OPT_ERR_TIMEOUT = -6,  /* a grace period timed out (a thread blocks signals); the change was rolled back */
    OPT_ERR_SYS = -7,      /* the operating system refused (mmap, files, signals) */
    OPT_ERR_PROFILE = -8   /* a profile file cannot be read or written, or is not a profile */
};

typedef struct opt_site_stats {
    uint64_t samples;         /* sampled fallback calls */
    uint64_t patches;         /* patches applied to this site */
    uint32_t target_count;    /* promoted targets, inline first, hottest first */
    uint32_t unreachable;     /* distinct sampled targets out of direct reach */
    const void *targets[8];
} opt_site_stats;

/* This thread's last error message ("" if none). Valid until this thread's next failing call. */
const char *opt_last_error(void);

/* Creates an engine from the config file at config_path; NULL: $OPTPOLINE_CONFIG, else defaults.
 * The engine watches the file and applies valid changes live. */
int opt_engine_create(const char *config_path, opt_engine **engine);
/* Stops the engine and frees its code memory: no thread may run engine or host code in it after. */
int opt_engine_destroy(opt_engine *engine);
/* Reads the config file again now (the engine also does so when the file changes). */
int opt_reload_config(opt_engine *engine);

/* Allocates size bytes of code memory (filled with int3): *rx is where it runs, *rw where it is written. */
int opt_code_alloc(opt_engine *engine, size_t size, void **rx, void **rw);
/* Declares a block (its rx start) completely written: names it in profiles and traces. Optional. */
int opt_code_publish(opt_engine *engine, void *rx, const char *name);
/* Frees a block by its rx start; no thread may run in it any more. */
int opt_code_free(opt_engine *engine, void *rx);

/* reg: x86 encoding 0=rax 1=rcx 2=rdx 3=rbx 5=rbp 6=rsi 7=rdi 8..15=r8..r15 (not 4=rsp, not 11=r11).
 * The site clobbers r11 only. */

/* An outline-only site: load the target into reg, then `call *entry` (a direct call rel32 to entry). */
int opt_site_create(opt_engine *engine, const char *name, int reg, opt_site **site, void **entry);
/* Writes an inline site (promotion.inlineSlots slots) at rx (rw: the same byte's writable address,
 * inside one block from opt_code_alloc). Load the target into reg before it. On OPT_ERR_ARG because
 * capacity is too small, *length is the size needed; on success, the bytes written. */
int opt_site_emit(opt_engine *engine, const char *name, int reg, void *rw, void *rx,
                  size_t capacity, size_t *length, opt_site **site);
/* Promotes targets (count 0: back to the fallback); waits for the grace period. */
int opt_site_promote(opt_engine *engine, opt_site *site, const void *const *targets, size_t count);
/* Back to the fallback. */
int opt_site_reset(opt_engine *engine, opt_site *site);
int opt_site_get_stats(opt_engine *engine, opt_site *site, opt_site_stats *stats);

/* One learning + patching epoch, synchronously (for learning.background = false). */
int opt_learn_epoch(opt_engine *engine);
/* Writes what the learner learned (per site name, target histograms) to path, for a restarted host. */
int opt_save_profile(opt_engine *engine, const char *path);
/* Reads a profile: the sites it names promote at their next epoch. Stale entries are ignored. */
int opt_load_profile(opt_engine *engine, const char *path);
/* enabled 0: demote every site and refuse promotions; 1: back to the config's promotion.mode. */
int opt_set_promotion(opt_engine *engine, int enabled);
/* suspended 1: no site changes at all; 0: resume. */
int opt_suspend_patching(opt_engine *engine, int suspended);

#ifdef __cplusplus
}
#endif

#endif /* OPTPOLINE_H */
