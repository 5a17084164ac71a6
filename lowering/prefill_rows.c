/* A-VL's prefill selection for one layer, every batch row (float32, on a CPU): the C twin of
 * avl_compile.policies.avl_prefill_rows.scored_prefill_rows. The scores from the attention's
 * log-sum-exp (the last rows' probabilities over every key, the text columns' sums), the
 * image rows ranked into core, other secondary rows and the evicted rest, H2O's text keep,
 * the slots' rows, recall's pages and the query-aware core's pages. As one Inductor-compiled
 * call the same work cost ~0.55 ms a layer on ``cpu-host`` inside a prefill, most of it the
 * call's own host work and four sorts (docs/history.md, sessions 22-25).
 *
 * Same rows: the tie rule is budgets.best_first's (higher score first, then the lower
 * position), H2O's the same (its stable sort); float sums may differ from torch's in the
 * last bit, as Inductor's do. Each group is chosen by a radix select of its last member's
 * rule key, then read off in position order: no sort.
 *
 * The batch rows' choices, then every (batch row, kv head)'s copies (the rows, pages and
 * boxes: most of the time), run on torch's threads where it has several.
 *
 * Built by lowering/native_build.py with the system C compiler; no torch headers. */

#include "native_helpers.h"
#include "prefill_rows.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* prefill_scores._probabilities for one entry: exp(q.k * scale + bias - lse), in float32,
 * NaN (a row with nothing to attend) as 0 */
static inline float probability(float qk, float scale, float bias, float lse) {
    float p = expf((qk * scale + bias) - lse);
    return isnan(p) ? 0.0f : p;
}

/* the lowest key of the `n` best (n <= count): a key is among them iff it is at least this;
 * UINT64_MAX with `*none` set where n is 0 */
static uint64_t threshold(const uint64_t *keys, int64_t count, int64_t n, int *none,
                          uint64_t *scratch) {
    *none = n <= 0;
    return *none ? UINT64_MAX : nth_largest_key(keys, count, n, scratch);
}

/* a row of `dim` floats (2,600 rows a layer on ``cpu-host``). GCC at -O3 turns this loop
 * into a call of memmove (loop distribution); kept a loop by a pragma, the op timed the
 * same (session 38) */
static inline void copy_row(float *restrict to, const float *restrict from, int64_t dim) {
    for (int64_t d = 0; d < dim; d++) to[d] = from[d];
}

static const float *row_of(const float *base, const int64_t *stride, int64_t b, int64_t h,
                           int64_t l) {
    return base + b * stride[0] + h * stride[1] + l * stride[2];
}

/* [Lk] the last window's probabilities, summed over its valid rows, head-averaged
 * (LseScoring.last_row_score); where `last_logit` [Hq, Lk] is given, each head's q.k of the
 * last query row with every key, whether or not the row is valid (recall's last_qk) */
static void image_score(const PrefillRowsArgs *a, int64_t b, float *score, float *head,
                        float *logit, float *last_logit) {
    const int64_t group = a->q_heads / a->kv_heads, k_len = a->k_len, window = a->window;
    const float *bias_base = a->last_bias + (a->last_bias_batch ? b : 0) * window * k_len;
    memset(score, 0, (size_t)k_len * sizeof *score);
    for (int64_t h = 0; h < a->q_heads; h++) {
        memset(head, 0, (size_t)k_len * sizeof *head);
        for (int64_t w = 0; w < window; w++) {
            const int64_t r = a->q_len - window + w;
            const int valid = window == 1 || a->query_valid[b * a->q_len + r]; /* else weight 0 */
            float *row_logit = w == window - 1 && last_logit ? last_logit + h * k_len : logit;
            if (!valid && row_logit == logit) continue;
            const float *q = row_of(a->query, a->query_stride, b, h, r);
            const float lse = *row_of(a->lse, a->lse_stride, b, h, r);
            const float *bias = bias_base + w * k_len;
            const float *keys = row_of(a->keys, a->keys_stride, b, h / group, 0);
            const int64_t step = a->keys_stride[2];
            /* the logits first, then their exponentials: no call inside the dot loop */
            for (int64_t j = 0; j < k_len; j++) row_logit[j] = dot(q, keys + j * step, a->dim);
            if (!valid) continue;
            for (int64_t j = 0; j < k_len; j++)
                if (bias[j] != -INFINITY) /* padding adds exp(-inf) = 0 */
                    head[j] += probability(row_logit[j], (float)a->scale, bias[j], lse);
        }
        for (int64_t j = 0; j < k_len; j++) score[j] += head[j];
    }
    for (int64_t j = 0; j < k_len; j++) score[j] /= (float)a->q_heads;
}

/* [Hkv, Lk] the text columns' attention summed over the valid query rows and each kv head's
 * query heads, 0 elsewhere (LseScoring.column_sums). The columns' keys are copied to one
 * block per kv head (`picked`, [n, D]) once, not gathered again for every query row */
static void text_scores(const PrefillRowsArgs *a, int64_t b, float *total, float *head,
                        float *logit, float *picked) {
    const int64_t group = a->q_heads / a->kv_heads, n = a->n_columns, dim = a->dim;
    const float *bias_base = a->column_bias
        + (a->column_bias_batch ? b : 0) * (a->q_len - a->first_row) * n;
    memset(total, 0, (size_t)(a->kv_heads * a->k_len) * sizeof *total);
    for (int64_t h = 0; h < a->q_heads; h++) {
        const int64_t kv = h / group;
        if (h % group == 0)
            for (int64_t c = 0; c < n; c++)
                copy_row(picked + c * dim, row_of(a->keys, a->keys_stride, b, kv, a->columns[c]),
                         dim);
        memset(head, 0, (size_t)n * sizeof *head);
        for (int64_t r = a->first_row; r < a->q_len; r++) {
            if (!a->query_valid[b * a->q_len + r]) continue;
            const float *q = row_of(a->query, a->query_stride, b, h, r);
            const float lse = *row_of(a->lse, a->lse_stride, b, h, r);
            const float *bias = bias_base + (r - a->first_row) * n;
            /* only the columns the row sees (causal: about half); the rest add 0 */
            for (int64_t c = 0; c < n; c++)
                logit[c] = bias[c] != -INFINITY ? dot(q, picked + c * dim, dim) : 0.0f;
            for (int64_t c = 0; c < n; c++)
                if (bias[c] != -INFINITY)
                    head[c] += probability(logit[c], (float)a->scale, bias[c], lse);
        }
        for (int64_t c = 0; c < n; c++) total[kv * a->k_len + a->columns[c]] += head[c];
    }
}

/* slots [0, others end) the other secondary rows, then the sink, from core start the core,
 * each ascending (prefill_rows' cat); the rest appended to `evicted` (ascending) */
static int64_t image_positions(const PrefillRowsArgs *a, int64_t b, const float *score,
                               uint64_t *keys, int64_t *slots, int64_t *evicted) {
    const int64_t *plan = a->plan + b * PLAN_COLUMNS;
    const int64_t *candidates = a->candidates + b * a->candidate_width;
    const int64_t count = plan[PLAN_CANDIDATES];
    for (int64_t i = 0; i < count; i++) keys[i] = rule_key(score[candidates[i]], candidates[i]);
    int no_core, no_secondary;
    uint64_t *scratch = keys + count;
    const uint64_t core_at = threshold(keys, count, plan[PLAN_CORE], &no_core, scratch);
    const uint64_t secondary_at =
        threshold(keys, count, plan[PLAN_SECONDARY], &no_secondary, scratch);
    int64_t other = 0, core = plan[PLAN_CORE_START], rest = 0;
    for (int64_t i = 0; i < count; i++) {
        if (!no_core && keys[i] >= core_at) slots[core++] = candidates[i];
        else if (!no_secondary && keys[i] >= secondary_at) slots[other++] = candidates[i];
        else evicted[rest++] = candidates[i];
    }
    const int64_t *sink = a->sink + b * a->sink_width;
    for (int64_t i = 0; i < plan[PLAN_SINK]; i++) slots[plan[PLAN_OTHERS_END] + i] = sink[i];
    return rest;
}

/* each kv head's text slots: H2O's keep (keep_heavy: the recent share and the heaviest older
 * text rows, where the row is over its budget; else every text row), in position order */
static void text_positions(const PrefillRowsArgs *a, int64_t b, int64_t kv, const float *score,
                           uint64_t *keys, int64_t *slots) {
    const int64_t *plan = a->plan + b * PLAN_COLUMNS;
    const int64_t k_len = a->k_len, at = (b * a->kv_heads + kv) * k_len;
    const uint8_t *text = a->text_slots + at, *recent = a->recent + at;
    const int over = plan[PLAN_OVER] != 0;
    int no_heavy = 1;
    uint64_t heavy_at = UINT64_MAX;
    if (over) {
        int64_t older = 0;
        for (int64_t j = 0; j < k_len; j++)
            if (text[j] && !recent[j]) keys[older++] = rule_key(score[j], j);
        const int64_t heavy = plan[PLAN_HEAVY] < older ? plan[PLAN_HEAVY] : older;
        heavy_at = threshold(keys, older, heavy, &no_heavy, keys + older);
    }
    int64_t slot = plan[PLAN_TEXT_START];
    const int64_t end = plan[PLAN_TEXT_END];
    for (int64_t j = 0; j < k_len && slot < end; j++) {
        int kept = text[j];
        if (over)
            kept = recent[j] || (text[j] && !no_heavy && rule_key(score[j], j) >= heavy_at);
        if (kept) slots[slot++] = j;
    }
}

/* the element-wise min and max over `count` rows (`rows[i]` of `base`); +inf and -inf
 * where there are none (page_core.box_of_held) */
static void box(const float *base, const int64_t *stride, int64_t b, int64_t h,
                const int64_t *rows, int64_t count, int64_t dim, float *low, float *high) {
    const float *pointers[count > 0 ? count : 1];
    for (int64_t i = 0; i < count; i++) pointers[i] = row_of(base, stride, b, h, rows[i]);
    box_rows(low, high, pointers, count, dim);
}

/* recall's pages of the evicted rows (recall.page_tensors), one batch row's positions: -1
 * past the rows */
static void recall_page_positions(const PrefillRowsArgs *a, int64_t b, const int64_t *evicted,
                                  int64_t n_evicted) {
    const int64_t count = a->recall_n_pages * a->recall_page_size;
    int64_t *positions = a->page_positions + b * count;
    for (int64_t i = 0; i < count; i++) positions[i] = i < n_evicted ? evicted[i] : -1;
}

/* one kv head's pages: an entry past the rows holds a copy of its page's last row (a page
 * with none: row 0) */
static void recall_pages(const PrefillRowsArgs *a, int64_t b, int64_t h, const int64_t *evicted,
                         int64_t n_evicted) {
    const int64_t size = a->recall_page_size, n_pages = a->recall_n_pages, dim = a->dim;
    for (int64_t p = 0; p < n_pages; p++) {
        const int64_t first = p * size;
        int64_t held = n_evicted - first;
        held = held < 0 ? 0 : (held > size ? size : held);
        const int64_t page = ((b * a->kv_heads + h) * n_pages + p);
        for (int64_t s = 0; s < size; s++) {
            const int64_t row = held ? evicted[first + (s < held ? s : held - 1)] : 0;
            const size_t at = (size_t)((page * size + s) * dim);
            copy_row(a->page_keys + at, row_of(a->keys, a->keys_stride, b, h, row), dim);
            copy_row(a->page_values + at, row_of(a->values, a->values_stride, b, h, row), dim);
        }
        box(a->keys, a->keys_stride, b, h, evicted + first, held, dim,
            a->page_low + page * dim, a->page_high + page * dim);
    }
}

/* the query-aware core's pages (page_core.core_page_tensors), one batch row's: each image
 * slot's ordinal among the row's image tokens and the slots of each page of ordinals */
static void core_members(const PrefillRowsArgs *a, int64_t b, const int64_t *slots) {
    const int64_t capacity = a->capacity, size = a->core_page_size, n_pages = a->core_n_pages;
    int64_t *ordinal = a->image_ordinal + b * capacity, *members = a->members + b * n_pages * size;
    const uint8_t *image = a->image_slot + b * capacity;
    const int64_t *image_positions = a->image_positions + b * a->n_image;
    for (int64_t i = 0; i < n_pages * size; i++) members[i] = -1;
    for (int64_t c = 0; c < capacity; c++) {
        ordinal[c] = image[c] ? count_below(image_positions, a->n_image, slots[c]) : -1;
        if (ordinal[c] >= 0 && ordinal[c] < n_pages * size) members[ordinal[c]] = c;
    }
}

/* one kv head's boxes of the core's pages, over its slots' keys */
static void core_boxes(const PrefillRowsArgs *a, int64_t b, int64_t h) {
    const int64_t capacity = a->capacity, size = a->core_page_size, n_pages = a->core_n_pages;
    const int64_t dim = a->dim, slot_stride[3] = {a->kv_heads * capacity * dim, capacity * dim, dim};
    const int64_t *members = a->members + b * n_pages * size;
    for (int64_t p = 0; p < n_pages; p++) {
        int64_t held[size > 0 ? size : 1], count = 0;
        for (int64_t s = 0; s < size; s++)
            if (members[p * size + s] >= 0) held[count++] = members[p * size + s];
        const int64_t at = ((b * a->kv_heads + h) * n_pages + p) * dim;
        box(a->slot_keys, slot_stride, b, h, held, count, dim, a->core_low + at,
            a->core_high + at);
    }
}

/* The call's scratch, one block for every batch row (threads share nothing else): the
 * scores and chosen rows of a row's first phase, read by its kv heads' second phase. */
typedef struct {
    const PrefillRowsArgs *a;
    int64_t widest, score_width;
    float *score;      /* [B, Lk + n_columns] */
    float *head;       /* [B, Lk + n_columns] */
    float *total;      /* [B, Hkv, Lk] the text columns' sums */
    float *picked;     /* [B, n_columns * D + 1] */
    float *last_logit; /* [B, Hq, Lk] (recall), else [B, 1] */
    uint64_t *keys;    /* [B * Hkv, 2 * widest] rule keys and their select's scratch */
    int64_t *slots;    /* [B, C] */
    int64_t *evicted;  /* [B, candidate_width + 1] */
    int64_t *n_evicted; /* [B] */
} RowsWork;

/* first phase, per batch row: the scores, the image rows chosen, the pages' positions, the
 * core's members */
static void choose_rows(void *context, int64_t begin, int64_t end) {
    const RowsWork *w = (const RowsWork *)context;
    const PrefillRowsArgs *a = w->a;
    const int64_t k_len = a->k_len, capacity = a->capacity, heads = a->kv_heads;
    const int recall = a->recall_page_size > 0;
    for (int64_t b = begin; b < end; b++) {
        float *score = w->score + b * w->score_width, *total = w->total + b * heads * k_len;
        int64_t *slots = w->slots + b * capacity;
        int64_t *evicted = w->evicted + b * (a->candidate_width + 1);
        /* scratch: `total` until text_scores writes it, the score's tail */
        image_score(a, b, score, w->head + b * w->score_width, total,
                    recall ? w->last_logit + b * a->q_heads * k_len : NULL);
        text_scores(a, b, total, w->head + b * w->score_width, score + k_len,
                    w->picked + b * (a->n_columns * a->dim + 1));
        for (int64_t c = 0; c < capacity; c++) slots[c] = -1;
        w->n_evicted[b] = image_positions(a, b, score, w->keys + b * heads * 2 * w->widest, slots,
                                          evicted);
        if (recall) recall_page_positions(a, b, evicted, w->n_evicted[b]);
        if (a->core_page_size) core_members(a, b, slots); /* image slots: every head's */
    }
}

/* second phase, per (batch row, kv head): its text rows, its slots' rows, its pages */
static void fill_heads(void *context, int64_t begin, int64_t end) {
    const RowsWork *w = (const RowsWork *)context;
    const PrefillRowsArgs *a = w->a;
    const int64_t k_len = a->k_len, capacity = a->capacity, dim = a->dim, heads = a->kv_heads;
    for (int64_t task = begin; task < end; task++) {
        const int64_t b = task / heads, h = task % heads;
        const float *total = w->total + (b * heads + h) * k_len;
        int64_t *position = a->position + (b * heads + h) * capacity;
        memcpy(position, w->slots + b * capacity, (size_t)capacity * sizeof *position);
        text_positions(a, b, h, total, w->keys + task * 2 * w->widest, position);
        const int64_t *rank = a->text_rank + (b * heads + h) * k_len;
        const uint8_t *not_text = a->not_text + b * capacity;
        for (int64_t c = 0; c < capacity; c++) {
            const int64_t row = position[c] < 0 ? 0 : position[c]; /* free: row 0 */
            const size_t at = (size_t)(((b * heads + h) * capacity + c) * dim);
            copy_row(a->slot_keys + at, row_of(a->keys, a->keys_stride, b, h, row), dim);
            copy_row(a->slot_values + at, row_of(a->values, a->values_stride, b, h, row), dim);
            const int64_t out = (b * heads + h) * capacity + c;
            a->slot_text_rank[out] = not_text[c] ? -1 : rank[row];
            a->slot_text_score[out] = not_text[c] ? 0.0f : total[row];
        }
        if (a->recall_page_size)
            recall_pages(a, b, h, w->evicted + b * (a->candidate_width + 1), w->n_evicted[b]);
        if (a->core_page_size) core_boxes(a, b, h);
    }
}

/* recall's last_qk, per batch row: the scaled q.k of the last row with each slot's key,
 * head-averaged (the image score's dots, read at the slot's row; row 0 where free, as its
 * copy) */
static void last_qk_of(const RowsWork *w, int64_t b) {
    const PrefillRowsArgs *a = w->a;
    const int64_t k_len = a->k_len, capacity = a->capacity, heads = a->kv_heads;
    const int64_t group = a->q_heads / heads;
    const float *last_logit = w->last_logit + b * a->q_heads * k_len;
    for (int64_t c = 0; c < capacity; c++) {
        float sum = 0.0f;
        for (int64_t h = 0; h < a->q_heads; h++) {
            const int64_t at = a->position[(b * heads + h / group) * capacity + c];
            sum += last_logit[h * k_len + (at < 0 ? 0 : at)] * (float)a->scale;
        }
        a->last_qk[b * capacity + c] = sum / (float)a->q_heads;
    }
}

static void run_inline(avl_parallel_body body, void *context, int64_t count) {
    body(context, 0, count);
}

int avl_prefill_rows(const PrefillRowsArgs *a, avl_parallel_runner run) {
    const int64_t batch = a->batch, k_len = a->k_len, heads = a->kv_heads;
    const int recall = a->recall_page_size > 0;
    if (run == NULL) run = run_inline;
    RowsWork w = {.a = a};
    w.widest = a->candidate_width > k_len ? a->candidate_width : k_len;
    w.score_width = k_len + a->n_columns;
    const size_t sizes[] = {
        sizeof(float) * (size_t)(batch * w.score_width),
        sizeof(float) * (size_t)(batch * w.score_width),
        sizeof(float) * (size_t)(batch * heads * k_len),
        sizeof(float) * (size_t)(batch * (a->n_columns * a->dim + 1)),
        sizeof(float) * (size_t)(batch * (recall ? a->q_heads * k_len : 1)),
        sizeof(uint64_t) * (size_t)(batch * heads * 2 * w.widest),
        sizeof(int64_t) * (size_t)(batch * a->capacity),
        sizeof(int64_t) * (size_t)(batch * (a->candidate_width + 1)),
        sizeof(int64_t) * (size_t)batch,
    };
    enum { N_PARTS = sizeof(sizes) / sizeof(sizes[0]) };
    size_t offsets[N_PARTS], bytes = 0;
    for (int i = 0; i < N_PARTS; i++) {
        offsets[i] = bytes;
        bytes += (sizes[i] + 63) & ~(size_t)63; /* cache lines: threads write their own */
    }
    char *block = malloc(bytes);
    if (!block) return -1;
    w.score = (float *)(block + offsets[0]), w.head = (float *)(block + offsets[1]);
    w.total = (float *)(block + offsets[2]), w.picked = (float *)(block + offsets[3]);
    w.last_logit = (float *)(block + offsets[4]), w.keys = (uint64_t *)(block + offsets[5]);
    w.slots = (int64_t *)(block + offsets[6]), w.evicted = (int64_t *)(block + offsets[7]);
    w.n_evicted = (int64_t *)(block + offsets[8]);
    /* the rows' copies are most of the time: every (batch row, kv head) its own task */
    run(choose_rows, &w, batch);
    run(fill_heads, &w, batch * heads);
    if (recall)
        for (int64_t b = 0; b < batch; b++) last_qk_of(&w, b);
    free(block);
    return 0;
}
