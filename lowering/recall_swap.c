/* Recall's swap for one layer, every batch row (float32 rows and scores, contiguous tensors):
 * the C twin of avl_compile.policies.recall.recall_before_step on a CPU, where the swap's
 * few hundred rows cost Inductor's generated code ~100-200 us a layer and step (gathers,
 * N x N counts, index checks; docs/history.md). Same rows, same order: the tie rule is
 * budgets.best_first's (higher score first, then the lower position); float sums may
 * differ from torch's in the last bit, as Inductor's do.
 *
 * Built by lowering/native_build.py with the system C compiler; no torch headers. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_helpers.h"

enum { ROLE_OTHER = 1, ROLE_CORE = 3 }; /* policies/avl_decode.py's OTHER and CORE */

typedef struct {
    float score;
    int64_t position;
    int64_t index; /* below C: a slot; else C + the recalled row */
} Candidate;

/* a ranks below b under the tie rule: a lower score, or as high and a higher position */
static int ranks_below(const Candidate *a, const Candidate *b) {
    if (a->score != b->score) return a->score < b->score;
    return a->position > b->position;
}

/* max-heap on "ranks above" (its root the best-ranked of the worst kept so far) */
static void sift_down(Candidate *heap, int64_t size, int64_t at) {
    for (;;) {
        int64_t child = 2 * at + 1, top = at;
        if (child < size && ranks_below(&heap[top], &heap[child])) top = child;
        if (child + 1 < size && ranks_below(&heap[top], &heap[child + 1])) top = child + 1;
        if (top == at) return;
        Candidate t = heap[at];
        heap[at] = heap[top];
        heap[top] = t;
        at = top;
    }
}

typedef struct {
    float bound;
    int64_t page;
} PageBound;

/* a ranks ahead of b: a higher bound, or as high and a lower page number */
static int page_ahead(const PageBound *a, const PageBound *b) {
    if (a->bound != b->bound) return a->bound > b->bound;
    return a->page < b->page;
}

/* the recall_pages pages whose digest bounds the head-averaged q.k highest (ties: the lower
 * page; pages holding nothing last), in page order */
static void choose_pages(int64_t *chosen, PageBound *best, const float *q, const int64_t *pos_b,
                         const float *page_low, const float *page_high, int64_t b,
                         int64_t q_heads, int64_t kv_heads, int64_t n_pages, int64_t page_size,
                         int64_t dim, int64_t recall_pages) {
    const int64_t group = q_heads / kv_heads;
    int64_t n_best = 0; /* the best pages so far, best first */
    for (int64_t p = 0; p < n_pages; p++) {
        PageBound page = {-INFINITY, p};
        if (pos_b[p * page_size] >= 0) {
            float total = 0.0f;
            for (int64_t h = 0; h < q_heads; h++) {
                int64_t at = ((b * kv_heads + h / group) * n_pages + p) * dim;
                total += box_bound(q + h * dim, page_low + at, page_high + at, dim);
            }
            page.bound = total / (float)q_heads;
        }
        if (n_best == recall_pages && page_ahead(&best[n_best - 1], &page)) continue;
        int64_t at = n_best < recall_pages ? n_best++ : n_best - 1;
        for (; at > 0 && page_ahead(&page, &best[at - 1]); at--) best[at] = best[at - 1];
        best[at] = page;
    }
    for (int64_t j = 0; j < recall_pages; j++) chosen[j] = best[j].page;
    for (int64_t j = 1; j < recall_pages; j++) { /* in page order */
        int64_t page = chosen[j], at = j;
        for (; at > 0 && chosen[at - 1] > page; at--) chosen[at] = chosen[at - 1];
        chosen[at] = page;
    }
}

static void widen_box(float *restrict low, float *restrict high, const float *restrict row,
                      int64_t dim) {
    for (int64_t d = 0; d < dim; d++) {
        low[d] = row[d] < low[d] ? row[d] : low[d];
        high[d] = row[d] > high[d] ? row[d] : high[d];
    }
}

/* Returns 0, or -1 where scratch memory could not be had (nothing written then). */
int avl_recall_swap(
    int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t capacity, int64_t dim,
    int64_t n_pages, int64_t page_size, int64_t recall_pages, double scale_in,
    const float *query,      /* [B, Hq, D], the last token's */
    float *keys, float *values, /* [B, Hkv, C, D] */
    int8_t *role,            /* [B, C] */
    int64_t *position,       /* [B, Hkv, C] */
    const float *last_qk,    /* [B, C] */
    int64_t *page_positions, /* [B, P, S] */
    float *page_keys, float *page_values, /* [B, Hkv, P, S, D] */
    float *page_low, float *page_high,    /* [B, Hkv, P, D] */
    /* the query-aware core's state, or NULLs (then n_image = 0) */
    int64_t *image_ordinal,          /* [B, C] */
    const int64_t *image_positions,  /* [B, N] ascending, padded past every position */
    int64_t n_image,
    float *core_low, float *core_high, /* [B, Hkv, NP, D] */
    int64_t *members,                  /* [B, NP, PS] */
    int64_t n_core_pages, int64_t core_page_size,
    const int64_t *chosen_in) { /* [B, R] the pages to bring, in page order; or NULL */
    const float scale = (float)scale_in;
    const int64_t group = q_heads / kv_heads;
    const int64_t moves = recall_pages * page_size;
    const int paged = image_ordinal != NULL;
    if (batch <= 0 || n_pages <= 0 || recall_pages <= 0 || recall_pages > n_pages) return 0;

    /* scratch, one block: the chosen pages' bounds, their rows, the ranked candidates */
    const int64_t rows_max = page_size > core_page_size ? page_size : core_page_size;
    const size_t sizes[] = {
        sizeof(PageBound) * (size_t)recall_pages, sizeof(int64_t) * (size_t)recall_pages,
        sizeof(int64_t) * (size_t)moves, sizeof(float) * (size_t)(kv_heads * moves * dim),
        sizeof(float) * (size_t)(kv_heads * moves * dim), sizeof(Candidate) * (size_t)moves,
        sizeof(int64_t) * (size_t)moves, sizeof(int64_t) * (size_t)moves,
        sizeof(int64_t) * (size_t)(2 * moves), sizeof(float *) * (size_t)rows_max,
        (size_t)moves, (size_t)(n_core_pages > 0 ? n_core_pages : 1),
    };
    enum { N_PARTS = sizeof(sizes) / sizeof(sizes[0]) };
    size_t offsets[N_PARTS], total = 0;
    for (int i = 0; i < N_PARTS; i++) {
        offsets[i] = total;
        total += (sizes[i] + 15) & ~(size_t)15;
    }
    char *block = malloc(total);
    if (!block) return -1;
    PageBound *best = (PageBound *)(block + offsets[0]);
    int64_t *chosen = (int64_t *)(block + offsets[1]);
    int64_t *recalled_position = (int64_t *)(block + offsets[2]);
    float *recalled_keys = (float *)(block + offsets[3]);
    float *recalled_values = (float *)(block + offsets[4]);
    Candidate *worst = (Candidate *)(block + offsets[5]);
    int64_t *freed = (int64_t *)(block + offsets[6]);
    int64_t *incoming = (int64_t *)(block + offsets[7]);
    int64_t *touched = (int64_t *)(block + offsets[8]);
    const float **rows = (const float **)(block + offsets[9]);
    char *leaves = block + offsets[10];
    char *boxed = block + offsets[11];

    for (int64_t b = 0; b < batch; b++) {
        const float *q = query + b * q_heads * dim;
        int64_t *pos_b = page_positions + b * n_pages * page_size;

        if (chosen_in != NULL) { /* chosen by the caller (large digests: see the Python) */
            memcpy(chosen, chosen_in + b * recall_pages, sizeof(int64_t) * (size_t)recall_pages);
        } else {
            choose_pages(chosen, best, q, pos_b, page_low, page_high, b, q_heads, kv_heads,
                         n_pages, page_size, dim, recall_pages);
        }

        /* their rows, copied: the pages take the rows that leave */
        int64_t n_recalled = 0;
        for (int64_t j = 0; j < recall_pages; j++)
            for (int64_t s = 0; s < page_size; s++) {
                int64_t m = j * page_size + s;
                recalled_position[m] = pos_b[chosen[j] * page_size + s];
                n_recalled += recalled_position[m] >= 0;
                for (int64_t h = 0; h < kv_heads; h++) {
                    int64_t from = (((b * kv_heads + h) * n_pages + chosen[j]) * page_size + s) * dim;
                    memcpy(recalled_keys + (h * moves + m) * dim, page_keys + from, sizeof(float) * dim);
                    memcpy(recalled_values + (h * moves + m) * dim, page_values + from,
                           sizeof(float) * dim);
                }
            }
        if (n_recalled == 0) continue; /* nothing to rank: the pages stay as they are */

        /* the n_recalled candidates ranked last among the resident image rows (the last
         * step's q.k) and the recalled rows (their q.k now): a heap of the worst so far */
        int64_t kept = 0;
        for (int64_t i = 0; i < capacity + moves; i++) {
            Candidate c;
            if (i < capacity) {
                int8_t r = role[b * capacity + i];
                if (r != ROLE_OTHER && r != ROLE_CORE) continue;
                c.score = last_qk[b * capacity + i];
                c.position = position[b * kv_heads * capacity + i];
            } else {
                int64_t m = i - capacity;
                if (recalled_position[m] < 0) continue;
                float total = 0.0f;
                for (int64_t h = 0; h < q_heads; h++) {
                    const float *k = recalled_keys + ((h / group) * moves + m) * dim;
                    total += dot(q + h * dim, k, dim) * scale;
                }
                c.score = total / (float)q_heads;
                c.position = recalled_position[m];
            }
            c.index = i;
            if (kept < n_recalled) {
                worst[kept++] = c;
                if (kept == n_recalled)
                    for (int64_t at = kept / 2 - 1; at >= 0; at--) sift_down(worst, kept, at);
            } else if (ranks_below(&c, &worst[0])) {
                worst[0] = c;
                sift_down(worst, kept, 0);
            }
        }

        /* the k-th slot freed (in rank order, the best-ranked of the leaving first) will
         * take the k-th recalled row that stays (page order) */
        int64_t n_freed = 0, n_incoming = 0;
        for (int64_t size = n_recalled; size > 0; size--) { /* the heap's root: the best */
            if (worst[0].index < capacity) freed[n_freed++] = worst[0].index;
            Candidate top = worst[0];
            worst[0] = worst[size - 1];
            worst[size - 1] = top;
            sift_down(worst, size - 1, 0);
        }

        /* the rows that leave fill the chosen pages' held slots in order of position */
        for (int64_t i = 1; i < n_recalled; i++) {
            Candidate c = worst[i];
            int64_t at = i;
            for (; at > 0 && worst[at - 1].position > c.position; at--) worst[at] = worst[at - 1];
            worst[at] = c;
        }
        int64_t next = 0;
        memset(leaves, 0, (size_t)moves);
        for (int64_t j = 0; j < recall_pages; j++) {
            int64_t page = chosen[j], held = 0;
            for (int64_t s = 0; s < page_size; s++) {
                int64_t m = j * page_size + s;
                if (recalled_position[m] < 0) break; /* a page's rows fill its first slots */
                const Candidate *c = &worst[next++];
                held++;
                pos_b[page * page_size + s] = c->position;
                if (c->index >= capacity) leaves[c->index - capacity] = 1;
                for (int64_t h = 0; h < kv_heads; h++) {
                    int64_t to = (((b * kv_heads + h) * n_pages + page) * page_size + s) * dim;
                    const float *k, *v;
                    if (c->index < capacity) {
                        int64_t from = ((b * kv_heads + h) * capacity + c->index) * dim;
                        k = keys + from;
                        v = values + from;
                    } else {
                        int64_t from = (h * moves + c->index - capacity) * dim;
                        k = recalled_keys + from;
                        v = recalled_values + from;
                    }
                    memcpy(page_keys + to, k, sizeof(float) * dim);
                    memcpy(page_values + to, v, sizeof(float) * dim);
                }
            }
            for (int64_t h = 0; h < kv_heads; h++) {
                int64_t base = ((b * kv_heads + h) * n_pages + page) * page_size * dim;
                for (int64_t s = 0; s < held; s++) rows[s] = page_keys + base + s * dim;
                int64_t at = ((b * kv_heads + h) * n_pages + page) * dim;
                box_rows(page_low + at, page_high + at, rows, held, dim);
            }
        }

        for (int64_t m = 0; m < moves; m++)
            if (recalled_position[m] >= 0 && !leaves[m]) incoming[n_incoming++] = m;
        int64_t n_left = 0, n_pairs = 0;
        int64_t *left_page = touched, *came_page = touched + moves;
        for (int64_t k = 0; k < n_freed && k < n_incoming; k++, n_pairs++) {
            int64_t slot = freed[k], m = incoming[k];
            for (int64_t h = 0; h < kv_heads; h++) {
                int64_t to = ((b * kv_heads + h) * capacity + slot) * dim;
                memcpy(keys + to, recalled_keys + (h * moves + m) * dim, sizeof(float) * dim);
                memcpy(values + to, recalled_values + (h * moves + m) * dim, sizeof(float) * dim);
                position[(b * kv_heads + h) * capacity + slot] = recalled_position[m];
            }
            role[b * capacity + slot] = ROLE_OTHER; /* it joins the core at a re-pick */
            if (paged) {
                int64_t left = image_ordinal[b * capacity + slot];
                int64_t came = count_below(image_positions + b * n_image, n_image,
                                           recalled_position[m]);
                image_ordinal[b * capacity + slot] = came;
                int64_t *row_members = members + b * n_core_pages * core_page_size;
                if (left >= 0) {
                    row_members[left] = -1; /* [NP, PS] flat: ordinal j*PS + i */
                    left_page[n_left++] = left / core_page_size;
                }
                row_members[came] = slot;
                came_page[k] = came / core_page_size;
            }
        }
        if (!paged) continue;
        /* the core's boxes: a page a row left is boxed again from its members; a page rows
         * only came to widens its box by them (min and max are exact either way) */
        memset(boxed, 0, (size_t)n_core_pages);
        for (int64_t t = 0; t < n_left; t++) {
            int64_t page = left_page[t];
            if (boxed[page]) continue;
            boxed[page] = 1;
            const int64_t *slots = members + (b * n_core_pages + page) * core_page_size;
            for (int64_t h = 0; h < kv_heads; h++) {
                int64_t n = 0;
                for (int64_t i = 0; i < core_page_size; i++)
                    if (slots[i] >= 0)
                        rows[n++] = keys + ((b * kv_heads + h) * capacity + slots[i]) * dim;
                int64_t at = ((b * kv_heads + h) * n_core_pages + page) * dim;
                box_rows(core_low + at, core_high + at, rows, n, dim);
            }
        }
        for (int64_t k = 0; k < n_pairs; k++) {
            int64_t page = came_page[k];
            if (boxed[page]) continue; /* its members, the row that came among them */
            for (int64_t h = 0; h < kv_heads; h++) {
                int64_t at = ((b * kv_heads + h) * n_core_pages + page) * dim;
                widen_box(core_low + at, core_high + at,
                          keys + ((b * kv_heads + h) * capacity + freed[k]) * dim, dim);
            }
        }
    }
    free(block);
    return 0;
}
