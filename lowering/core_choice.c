/* The query-aware core's choice for one layer and decode step, every batch row (float32
 * boxes and query, contiguous tensors): the C twin of the tensor route in
 * avl_compile.policies.page_core (CorePages.bound_per_slot, then avl_decode's re-pick), where
 * a page bound kernel, a sort of every slot's int64 rule key, a scatter of ranks and a role
 * write cost Inductor's generated code ~70 us a layer and step on ``cpu-host``
 * (docs/history.md, session 23). Same rows: the tie rule is budgets.best_first's (higher
 * score first, then rows already in the core, then the lower position); float sums may
 * differ from torch's in the last bits, as Inductor's do (a page's bound is summed per kv
 * head from its query heads' sums, split by sign: native_helpers.h's box_bound).
 *
 * Built by lowering/native_build.py with the system C compiler; no torch headers. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_helpers.h"

enum { ROLE_OTHER = 1, ROLE_CORE = 3 }; /* policies/avl_decode.py's OTHER and CORE */
enum { N_CORE_COLUMN = 3 };             /* avl_decode.py's N_CORE, of counters [B, 5] */

typedef struct {
    float score;
    int preferred; /* in the core before this step */
    int64_t position;
    int64_t slot;
} Candidate;

/* a ranks ahead of b among equal scores: in the core before, then the lower position */
static int compare_tied(const void *x, const void *y) {
    const Candidate *a = x, *b = y;
    if (a->preferred != b->preferred) return b->preferred - a->preferred;
    return (a->position > b->position) - (a->position < b->position);
}

/* the n-th largest (1-based, n <= count) of keys: a radix select, a byte at a time from the
 * top, counting only keys that share the bytes chosen so far (branch-free counts: the heap
 * it replaced mispredicted its comparisons of random scores) */
static uint32_t nth_largest(const uint32_t *keys, int64_t count, int64_t n) {
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        int64_t histogram[256] = {0};
        for (int64_t i = 0; i < count; i++)
            histogram[(keys[i] >> shift) & 255u] += (keys[i] & mask) == prefix;
        int digit = 255;
        for (; digit > 0 && n > histogram[digit]; digit--) n -= histogram[digit];
        prefix |= (uint32_t)digit << shift;
        mask |= 255u << shift;
    }
    return prefix;
}

/* Returns 0, or -1 where scratch memory could not be had (nothing written then). */
int avl_core_choice(
    int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t capacity, int64_t dim,
    int64_t n_pages, int64_t page_size,
    const float *query,         /* [B, Hq, D], this step's */
    const float *low, const float *high, /* [B, Hkv, NP, D] the pages' boxes */
    const float *page_bound,    /* [B, NP] the pages' bounds, or NULL: computed here */
    const int64_t *image_ordinal, /* [B, C] */
    int8_t *role,               /* [B, C]: OTHER and CORE rows re-chosen in place */
    const int64_t *position,    /* [B, Hkv, C] (head 0's read) */
    const int64_t *counters) {  /* [B, 5] */
    if (batch <= 0 || capacity <= 0) return 0;
    float *bound = malloc(sizeof(float) * (size_t)(n_pages > 0 ? n_pages : 1));
    char *known = calloc((size_t)(n_pages > 0 ? n_pages : 1), 1);
    Candidate *candidates = malloc(sizeof(Candidate) * (size_t)capacity);
    uint32_t *keys = malloc(sizeof(uint32_t) * (size_t)capacity);
    float *split = malloc(sizeof(float) * (size_t)(2 * kv_heads * dim)); /* split_query's */
    if (!bound || !known || !candidates || !keys || !split) {
        free(bound);
        free(known);
        free(candidates);
        free(keys);
        free(split);
        return -1;
    }
    float *positive = split, *negative = split + kv_heads * dim;
    for (int64_t b = 0; b < batch; b++) {
        int8_t *role_b = role + b * capacity;
        const int64_t n_core = counters[b * 5 + N_CORE_COLUMN];
        int64_t count = 0;
        if (page_bound == NULL) {
            for (int64_t p = 0; p < n_pages; p++) known[p] = 0;
            split_query(positive, negative, query + b * q_heads * dim, q_heads, kv_heads, dim);
        }
        for (int64_t i = 0; i < capacity; i++) {
            int8_t r = role_b[i];
            if (r != ROLE_OTHER && r != ROLE_CORE) continue;
            int64_t page = image_ordinal[b * capacity + i] / page_size;
            page = page < 0 ? 0 : (page >= n_pages ? n_pages - 1 : page);
            float score;
            if (page_bound != NULL) {
                score = page_bound[b * n_pages + page];
            } else {
                if (!known[page]) { /* only the pages that hold a candidate are bounded */
                    float total = 0.0f;
                    for (int64_t h = 0; h < kv_heads; h++) {
                        int64_t at = ((b * kv_heads + h) * n_pages + page) * dim;
                        total += box_bound(positive + h * dim, negative + h * dim, low + at,
                                           high + at, dim);
                    }
                    bound[page] = total / (float)q_heads;
                    known[page] = 1;
                }
                score = bound[page];
            }
            Candidate c = {score, r == ROLE_CORE, position[b * kv_heads * capacity + i], i};
            candidates[count] = c;
            keys[count++] = ordered_key(score);
            role_b[i] = ROLE_OTHER;
        }
        if (n_core <= 0 || count == 0) continue;
        if (n_core >= count) {
            for (int64_t k = 0; k < count; k++) role_b[candidates[k].slot] = ROLE_CORE;
            continue;
        }
        /* the rows scored above the n_core-th score are in; of the rows at that score, the
         * tie rule takes as many as are left */
        const uint32_t threshold = nth_largest(keys, count, n_core);
        int64_t chosen = 0, tied = 0;
        for (int64_t k = 0; k < count; k++) {
            if (keys[k] > threshold) {
                role_b[candidates[k].slot] = ROLE_CORE;
                chosen++;
            } else if (keys[k] == threshold) {
                candidates[tied++] = candidates[k]; /* tied <= k: nothing unread is overwritten */
            }
        }
        qsort(candidates, (size_t)tied, sizeof(Candidate), compare_tied);
        for (int64_t k = 0; k < n_core - chosen; k++) role_b[candidates[k].slot] = ROLE_CORE;
    }
    free(bound);
    free(known);
    free(candidates);
    free(keys);
    free(split);
    return 0;
}
