/* Recall's swap for one layer, every batch row (float32 rows and scores, contiguous tensors):
 * the C twin of avl_compile.policies.recall.recall_before_step on a CPU, where the swap's
 * few hundred rows cost Inductor's generated code ~100-200 us a layer and step (gathers,
 * N x N counts, index checks; docs/history.md). Same rows, same order: the tie rule is
 * budgets.best_first's (higher score first, then the lower position); float sums may
 * differ from torch's in the last bits, as Inductor's do (bounds and a recalled row's q.k
 * are summed per kv head from its query heads' sums).
 *
 * Built by lowering/native_build.py with the system C compiler; no torch headers. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_helpers.h"
#include "native_parallel.h"

enum { ROLE_OTHER = 1, ROLE_CORE = 3 }; /* policies/avl_decode.py's OTHER and CORE */

typedef struct {
    uint64_t key; /* rule_key: a higher key ranks higher */
    int64_t position;
    int64_t index; /* below C: a slot; else C + the recalled row */
} Candidate;

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
static void choose_pages(int64_t *chosen, PageBound *best, float *split, const float *q,
                         const int64_t *pos_b, const float *page_low, const float *page_high,
                         int64_t b, int64_t q_heads, int64_t kv_heads, int64_t n_pages,
                         int64_t page_size, int64_t dim, int64_t recall_pages) {
    float *positive = split, *negative = split + kv_heads * dim;
    split_query(positive, negative, q, q_heads, kv_heads, dim);
    int64_t n_best = 0; /* the best pages so far, best first */
    for (int64_t p = 0; p < n_pages; p++) {
        PageBound page = {-INFINITY, p};
        if (pos_b[p * page_size] >= 0) {
            float total = 0.0f;
            for (int64_t h = 0; h < kv_heads; h++) {
                int64_t at = ((b * kv_heads + h) * n_pages + p) * dim;
                total += box_bound(positive + h * dim, negative + h * dim, page_low + at,
                                   page_high + at, dim);
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

/* One batch row's swap as planned (serially, on the caller's thread): what each kv head's
 * rows do. The heads touch disjoint rows and boxes, so a runner may hand them to threads:
 * the swap reads a few MB of rows and boxes scattered in memory, latency more than work. */
typedef struct {
    int64_t b, kv_heads, capacity, dim, n_pages, page_size, recall_pages, moves;
    int64_t n_core_pages, core_page_size, rows_max;
    float *keys, *values;
    int64_t *position;
    float *page_keys, *page_values, *page_low, *page_high;
    float *core_low, *core_high;
    const int64_t *members;
    const int64_t *chosen;            /* [R] the pages brought, in page order */
    const int64_t *recalled_position; /* [M] the chosen pages' positions before the swap */
    const int64_t *page_source;       /* [M] what fills page slot m: a cache slot, C + a
                                       * recalled row, or -1 (the page's slot stays empty) */
    const int64_t *freed, *incoming;  /* [pairs] slot freed[k] takes recalled row incoming[k] */
    int64_t n_pairs;
    const int64_t *rebox; /* core pages a row left: boxed again from their members */
    int64_t n_rebox;
    const int64_t *widen; /* pairs whose core page only gained a row: its box widens */
    int64_t n_widen;
    const int64_t *came_page; /* [pairs] the core page of recalled row incoming[k] */
    float *recalled_keys, *recalled_values; /* scratch [Hkv, M, D] */
    const float **rows;                     /* scratch [Hkv, rows_max] */
} HeadWork;

/* items (pages, rows) whose memory swap_heads asks for ahead of their use (2 to 8 alike) */
enum { AHEAD = 4 };

AVL_ALWAYS_INLINE void prefetch_core_page(const HeadWork *w, int64_t bh, int64_t page) {
    const size_t row_bytes = sizeof(float) * (size_t)w->dim;
    const int64_t *slots = w->members + (w->b * w->n_core_pages + page) * w->core_page_size;
    for (int64_t i = 0; i < w->core_page_size; i++)
        if (slots[i] >= 0) prefetch_bytes(w->keys + (bh * w->capacity + slots[i]) * w->dim, row_bytes);
    int64_t at = (bh * w->n_core_pages + page) * w->dim;
    prefetch_bytes_to_write(w->core_low + at, row_bytes);
    prefetch_bytes_to_write(w->core_high + at, row_bytes);
}

static void swap_heads(void *context, int64_t begin, int64_t end) {
    const HeadWork *w = (const HeadWork *)context;
    const int64_t dim = w->dim, moves = w->moves, page_size = w->page_size;
    const size_t row_bytes = sizeof(float) * (size_t)dim;
    for (int64_t h = begin; h < end; h++) {
        const int64_t bh = w->b * w->kv_heads + h;
        float *recalled_keys = w->recalled_keys + h * moves * dim;
        float *recalled_values = w->recalled_values + h * moves * dim;
        const float **rows = w->rows + h * w->rows_max;
        /* the chosen pages' rows, copied: the pages take the rows that leave */
        for (int64_t j = 0; j < w->recall_pages; j++) {
            int64_t from = (bh * w->n_pages + w->chosen[j]) * page_size * dim;
            memcpy(recalled_keys + j * page_size * dim, w->page_keys + from, row_bytes * page_size);
            memcpy(recalled_values + j * page_size * dim, w->page_values + from,
                   row_bytes * page_size);
        }
        for (int64_t j = 0; j < w->recall_pages; j++) {
            int64_t page = w->chosen[j], held = 0;
            int64_t base = (bh * w->n_pages + page) * page_size * dim;
            for (int64_t s = 0; j + 1 < w->recall_pages && s < page_size; s++) {
                int64_t next = w->page_source[(j + 1) * page_size + s];
                if (next < 0) break;
                if (next >= w->capacity) continue; /* a recalled row: copied just now */
                prefetch_bytes(w->keys + (bh * w->capacity + next) * dim, row_bytes);
                prefetch_bytes(w->values + (bh * w->capacity + next) * dim, row_bytes);
            }
            for (int64_t s = 0; s < page_size; s++) {
                int64_t source = w->page_source[j * page_size + s];
                if (source < 0) break; /* a page's rows fill its first slots */
                const float *k, *v;
                if (source < w->capacity) {
                    k = w->keys + (bh * w->capacity + source) * dim;
                    v = w->values + (bh * w->capacity + source) * dim;
                } else {
                    k = recalled_keys + (source - w->capacity) * dim;
                    v = recalled_values + (source - w->capacity) * dim;
                }
                memcpy(w->page_keys + base + s * dim, k, row_bytes);
                memcpy(w->page_values + base + s * dim, v, row_bytes);
                rows[held++] = w->page_keys + base + s * dim;
            }
            int64_t at = (bh * w->n_pages + page) * dim;
            box_rows(w->page_low + at, w->page_high + at, rows, held, dim);
        }
        for (int64_t k = 0; k < w->n_pairs; k++) {
            if (k + AHEAD < w->n_pairs) {
                int64_t ahead = (bh * w->capacity + w->freed[k + AHEAD]) * dim;
                prefetch_bytes_to_write(w->keys + ahead, row_bytes);
                prefetch_bytes_to_write(w->values + ahead, row_bytes);
            }
            int64_t slot = w->freed[k], m = w->incoming[k];
            int64_t to = (bh * w->capacity + slot) * dim;
            memcpy(w->keys + to, recalled_keys + m * dim, row_bytes);
            memcpy(w->values + to, recalled_values + m * dim, row_bytes);
            w->position[bh * w->capacity + slot] = w->recalled_position[m];
        }
        /* the core's boxes: a page a row left is boxed again from its members; a page rows
         * only came to widens its box by them (min and max are exact either way) */
        for (int64_t t = 0; t < AHEAD && t < w->n_rebox; t++) prefetch_core_page(w, bh, w->rebox[t]);
        for (int64_t t = 0; t < w->n_rebox; t++) {
            if (t + AHEAD < w->n_rebox) prefetch_core_page(w, bh, w->rebox[t + AHEAD]);
            int64_t page = w->rebox[t], n = 0;
            const int64_t *slots = w->members + (w->b * w->n_core_pages + page) * w->core_page_size;
            for (int64_t i = 0; i < w->core_page_size; i++)
                if (slots[i] >= 0) rows[n++] = w->keys + (bh * w->capacity + slots[i]) * dim;
            int64_t at = (bh * w->n_core_pages + page) * dim;
            box_rows(w->core_low + at, w->core_high + at, rows, n, dim);
        }
        for (int64_t t = 0; t < w->n_widen; t++) {
            if (t + AHEAD < w->n_widen) {
                int64_t ahead = (bh * w->n_core_pages + w->came_page[w->widen[t + AHEAD]]) * dim;
                prefetch_bytes_to_write(w->core_low + ahead, row_bytes);
                prefetch_bytes_to_write(w->core_high + ahead, row_bytes);
            }
            int64_t k = w->widen[t];
            int64_t at = (bh * w->n_core_pages + w->came_page[k]) * dim;
            widen_box(w->core_low + at, w->core_high + at,
                      w->keys + (bh * w->capacity + w->freed[k]) * dim, dim);
        }
    }
}

static void run_inline(avl_parallel_body body, void *context, int64_t count) {
    body(context, 0, count);
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
    const int64_t *chosen_in, /* [B, R] the pages to bring, in page order; or NULL */
    avl_parallel_runner run_heads) { /* runs swap_heads over the kv heads; NULL: inline */
    const float scale = (float)scale_in;
    const int64_t group = q_heads / kv_heads;
    const int64_t moves = recall_pages * page_size;
    const int paged = image_ordinal != NULL;
    if (batch <= 0 || n_pages <= 0 || recall_pages <= 0 || recall_pages > n_pages) return 0;
    if (run_heads == NULL) run_heads = run_inline;

    /* scratch, one block: the chosen pages' bounds, their rows, the ranked candidates, the
     * plan's lists */
    const int64_t rows_max = page_size > core_page_size ? page_size : core_page_size;
    const size_t sizes[] = {
        sizeof(PageBound) * (size_t)recall_pages, sizeof(int64_t) * (size_t)recall_pages,
        sizeof(int64_t) * (size_t)moves, sizeof(float) * (size_t)(kv_heads * moves * dim),
        sizeof(float) * (size_t)(kv_heads * moves * dim), sizeof(Candidate) * (size_t)moves,
        sizeof(Candidate) * (size_t)(capacity + moves),
        sizeof(uint64_t) * (size_t)(capacity + moves),
        sizeof(uint64_t) * (size_t)(capacity + moves), sizeof(Candidate) * (size_t)moves,
        sizeof(int64_t) * (size_t)moves, sizeof(int64_t) * (size_t)moves,
        sizeof(int64_t) * (size_t)(2 * moves), sizeof(float *) * (size_t)(kv_heads * rows_max),
        (size_t)moves, (size_t)(n_core_pages > 0 ? n_core_pages : 1),
        sizeof(int64_t) * (size_t)moves, sizeof(int64_t) * (size_t)moves,
        sizeof(int64_t) * (size_t)moves, sizeof(float) * (size_t)(2 * kv_heads * dim),
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
    Candidate *leaving = (Candidate *)(block + offsets[5]);
    Candidate *candidates = (Candidate *)(block + offsets[6]);
    uint64_t *keys_of = (uint64_t *)(block + offsets[7]);
    uint64_t *select_scratch = (uint64_t *)(block + offsets[8]);
    Candidate *leaving_slots = (Candidate *)(block + offsets[9]);
    int64_t *freed = (int64_t *)(block + offsets[10]);
    int64_t *incoming = (int64_t *)(block + offsets[11]);
    int64_t *touched = (int64_t *)(block + offsets[12]);
    const float **rows = (const float **)(block + offsets[13]);
    char *leaves = block + offsets[14];
    char *boxed = block + offsets[15];
    int64_t *page_source = (int64_t *)(block + offsets[16]);
    int64_t *rebox = (int64_t *)(block + offsets[17]);
    int64_t *widen = (int64_t *)(block + offsets[18]);
    float *split = (float *)(block + offsets[19]); /* split_query's */

    for (int64_t b = 0; b < batch; b++) {
        const float *q = query + b * q_heads * dim;
        int64_t *pos_b = page_positions + b * n_pages * page_size;

        if (chosen_in != NULL) { /* chosen by the caller (large digests: see the Python) */
            memcpy(chosen, chosen_in + b * recall_pages, sizeof(int64_t) * (size_t)recall_pages);
        } else {
            choose_pages(chosen, best, split, q, pos_b, page_low, page_high, b, q_heads,
                         kv_heads, n_pages, page_size, dim, recall_pages);
        }

        int64_t n_recalled = 0;
        for (int64_t j = 0; j < recall_pages; j++)
            for (int64_t s = 0; s < page_size; s++) {
                int64_t m = j * page_size + s;
                recalled_position[m] = pos_b[chosen[j] * page_size + s];
                n_recalled += recalled_position[m] >= 0;
            }
        if (n_recalled == 0) continue; /* nothing to rank: the pages stay as they are */

        /* the candidates: the resident image rows (the last step's q.k) and the recalled
         * rows (their q.k now, read in their pages) */
        int64_t count = 0;
        for (int64_t i = 0; i < capacity; i++) {
            int8_t r = role[b * capacity + i];
            if (r != ROLE_OTHER && r != ROLE_CORE) continue;
            int64_t at = position[b * kv_heads * capacity + i];
            candidates[count++] = (Candidate){rule_key(last_qk[b * capacity + i], at), at, i};
        }
        /* a kv head's query heads read the same key: the dot of their sum with it is the
         * sum of their dots */
        float *group_query = split; /* [Hkv, D] (choose_pages is done with it) */
        for (int64_t i = 0; i < kv_heads * dim; i++) group_query[i] = 0.0f;
        for (int64_t h = 0; h < q_heads; h++)
            for (int64_t d = 0; d < dim; d++) group_query[(h / group) * dim + d] += q[h * dim + d];
        for (int64_t m = 0; m < moves; m++) {
            if (recalled_position[m] < 0) continue;
            int64_t page = chosen[m / page_size], s = m % page_size;
            float total = 0.0f;
            for (int64_t h = 0; h < kv_heads; h++) {
                int64_t at = (((b * kv_heads + h) * n_pages + page) * page_size + s);
                total += dot(group_query + h * dim, page_keys + at * dim, dim);
            }
            total *= scale;
            candidates[count++] = (Candidate){rule_key(total / (float)q_heads,
                                                       recalled_position[m]),
                                              recalled_position[m], capacity + m};
        }
        /* the n_recalled ranked last leave: every key below the lowest kept one (a radix
         * select; the keys are distinct, as the positions) */
        const int64_t keep = count - n_recalled;
        for (int64_t c = 0; c < count; c++) keys_of[c] = candidates[c].key;
        const uint64_t lowest_kept =
            keep > 0 ? nth_largest_key(keys_of, count, keep, select_scratch) : 0;
        int64_t n_leaving = 0, n_freed = 0, n_incoming = 0;
        for (int64_t c = 0; c < count; c++) {
            if (keep > 0 && candidates[c].key >= lowest_kept) continue;
            leaving[n_leaving++] = candidates[c];
            if (candidates[c].index < capacity) leaving_slots[n_freed++] = candidates[c];
        }

        /* the k-th slot freed (in rank order, the best-ranked of the leaving first) will
         * take the k-th recalled row that stays (page order) */
        for (int64_t i = 1; i < n_freed; i++) {
            Candidate c = leaving_slots[i];
            int64_t at = i;
            for (; at > 0 && leaving_slots[at - 1].key < c.key; at--)
                leaving_slots[at] = leaving_slots[at - 1];
            leaving_slots[at] = c;
        }
        for (int64_t k = 0; k < n_freed; k++) freed[k] = leaving_slots[k].index;

        /* the rows that leave fill the chosen pages' held slots in order of position */
        for (int64_t i = 1; i < n_leaving; i++) {
            Candidate c = leaving[i];
            int64_t at = i;
            for (; at > 0 && leaving[at - 1].position > c.position; at--)
                leaving[at] = leaving[at - 1];
            leaving[at] = c;
        }
        int64_t next = 0;
        memset(leaves, 0, (size_t)moves);
        for (int64_t m = 0; m < moves; m++) {
            page_source[m] = -1;
            if (recalled_position[m] < 0) continue;
            const Candidate *c = &leaving[next++];
            page_source[m] = c->index;
            pos_b[chosen[m / page_size] * page_size + m % page_size] = c->position;
            if (c->index >= capacity) leaves[c->index - capacity] = 1;
        }

        for (int64_t m = 0; m < moves; m++)
            if (recalled_position[m] >= 0 && !leaves[m]) incoming[n_incoming++] = m;
        int64_t n_left = 0, n_pairs = 0;
        int64_t *left_page = touched, *came_page = touched + moves;
        for (int64_t k = 0; k < n_freed && k < n_incoming; k++, n_pairs++) {
            int64_t slot = freed[k], m = incoming[k];
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
        int64_t n_rebox = 0, n_widen = 0;
        if (paged) {
            memset(boxed, 0, (size_t)n_core_pages);
            for (int64_t t = 0; t < n_left; t++) {
                if (boxed[left_page[t]]) continue;
                boxed[left_page[t]] = 1;
                rebox[n_rebox++] = left_page[t];
            }
            for (int64_t k = 0; k < n_pairs; k++) /* else its members, the row among them */
                if (!boxed[came_page[k]]) widen[n_widen++] = k;
        }

        HeadWork work = {
            .b = b, .kv_heads = kv_heads, .capacity = capacity, .dim = dim,
            .n_pages = n_pages, .page_size = page_size, .recall_pages = recall_pages,
            .moves = moves, .n_core_pages = n_core_pages, .core_page_size = core_page_size,
            .rows_max = rows_max, .keys = keys, .values = values, .position = position,
            .page_keys = page_keys, .page_values = page_values, .page_low = page_low,
            .page_high = page_high, .core_low = core_low, .core_high = core_high,
            .members = members, .chosen = chosen, .recalled_position = recalled_position,
            .page_source = page_source, .freed = freed, .incoming = incoming,
            .n_pairs = n_pairs, .rebox = rebox, .n_rebox = n_rebox, .widen = widen,
            .n_widen = n_widen, .came_page = came_page, .recalled_keys = recalled_keys,
            .recalled_values = recalled_values, .rows = rows,
        };
        run_heads(swap_heads, &work, kv_heads);
    }
    free(block);
    return 0;
}
