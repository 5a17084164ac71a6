/* The query-aware core's choice for one layer and decode step, every batch row (float32
 * boxes and query, contiguous tensors): the C twin of the tensor route in
 * avl_compile.policies.page_core (CorePages.bound_per_slot, then avl_decode's re-pick), where
 * a page bound kernel, a sort of every slot's int64 rule key, a scatter of ranks and a role
 * write cost Inductor's generated code ~70 us a layer and step on ``cpu-host``
 * (docs/history.md, session 23). Same rows: the tie rule is budgets.best_first's (higher
 * score first, then rows already in the core, then the lower position); float sums may
 * differ from torch's in the last bit, as Inductor's do.
 *
 * Built by lowering/native_build.py with the system C compiler; no torch headers. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

enum { ROLE_OTHER = 1, ROLE_CORE = 3 }; /* policies/avl_decode.py's OTHER and CORE */
enum { N_CORE_COLUMN = 3 };             /* avl_decode.py's N_CORE, of counters [B, 5] */

typedef struct {
    float score;
    int preferred; /* in the core before this step */
    int64_t position;
    int64_t slot;
} Candidate;

/* a ranks below b under the tie rule */
static int ranks_below(const Candidate *a, const Candidate *b) {
    if (a->score != b->score) return a->score < b->score;
    if (a->preferred != b->preferred) return a->preferred < b->preferred;
    return a->position > b->position;
}

/* min-heap under the rule: its root is the lowest-ranked candidate kept so far */
static void sift_down(Candidate *heap, int64_t size, int64_t at) {
    for (;;) {
        int64_t child = 2 * at + 1, low = at;
        if (child < size && ranks_below(&heap[child], &heap[low])) low = child;
        if (child + 1 < size && ranks_below(&heap[child + 1], &heap[low])) low = child + 1;
        if (low == at) return;
        Candidate t = heap[at];
        heap[at] = heap[low];
        heap[low] = t;
        at = low;
    }
}

/* sums in 8 lanes, added pairwise at the end (as recall_swap.c's) */
enum { LANES = 8 };

static float box_bound(const float *restrict q, const float *restrict low,
                       const float *restrict high, int64_t dim) {
    float lane[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= dim; d += LANES)
        for (int j = 0; j < LANES; j++) {
            float lo = q[d + j] * low[d + j], hi = q[d + j] * high[d + j];
            lane[j] += lo > hi ? lo : hi;
        }
    for (; d < dim; d++) {
        float lo = q[d] * low[d], hi = q[d] * high[d];
        lane[0] += lo > hi ? lo : hi;
    }
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
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
    const int64_t group = q_heads / kv_heads;
    if (batch <= 0 || capacity <= 0) return 0;
    float *bound = malloc(sizeof(float) * (size_t)(n_pages > 0 ? n_pages : 1));
    char *known = calloc((size_t)(n_pages > 0 ? n_pages : 1), 1);
    Candidate *best = malloc(sizeof(Candidate) * (size_t)capacity);
    if (!bound || !known || !best) {
        free(bound);
        free(known);
        free(best);
        return -1;
    }
    for (int64_t b = 0; b < batch; b++) {
        int8_t *role_b = role + b * capacity;
        const int64_t n_core = counters[b * 5 + N_CORE_COLUMN];
        int64_t kept = 0;
        if (page_bound == NULL)
            for (int64_t p = 0; p < n_pages; p++) known[p] = 0;
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
                    for (int64_t h = 0; h < q_heads; h++) {
                        int64_t at = ((b * kv_heads + h / group) * n_pages + page) * dim;
                        total += box_bound(query + (b * q_heads + h) * dim, low + at, high + at, dim);
                    }
                    bound[page] = total / (float)q_heads;
                    known[page] = 1;
                }
                score = bound[page];
            }
            Candidate c = {score, r == ROLE_CORE, position[b * kv_heads * capacity + i], i};
            role_b[i] = ROLE_OTHER;
            if (n_core <= 0) continue;
            if (kept < n_core) {
                best[kept++] = c;
                if (kept == n_core)
                    for (int64_t at = kept / 2 - 1; at >= 0; at--) sift_down(best, kept, at);
            } else if (ranks_below(&best[0], &c)) {
                best[0] = c;
                sift_down(best, kept, 0);
            }
        }
        for (int64_t k = 0; k < kept; k++) role_b[best[k].slot] = ROLE_CORE;
    }
    free(bound);
    free(known);
    free(best);
    return 0;
}
