/* Small helpers shared by lowering's C sources (recall_swap.c, core_choice.c,
 * prefill_rows.c): static inline, so each source compiles its own copy. No torch headers. */

#ifndef AVL_NATIVE_HELPERS_H
#define AVL_NATIVE_HELPERS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* sums in 8 lanes, added pairwise at the end: a single running sum is a chain of dependent
 * adds (its latency, not the arithmetic, was most of the swap's time); the order differs
 * from torch's in the last bit at most, as Inductor's does */
enum { LANES = 8 };

static inline float lanes_total(const float *lane) {
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

static inline float dot(const float *restrict a, const float *restrict b, int64_t dim) {
    float lane[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= dim; d += LANES)
        for (int j = 0; j < LANES; j++) lane[j] += a[d + j] * b[d + j];
    for (; d < dim; d++) lane[0] += a[d] * b[d];
    return lanes_total(lane);
}

/* a box's bound summed over a kv head's query heads needs only two sums of the group's
 * queries: q * low and q * high, whichever is larger, is q * high where q >= 0 and q * low
 * where q < 0, so the group's sum of them is positive . high + negative . low, where
 * `positive` [kv_heads, dim] sums max(q, 0) over the group and `negative` min(q, 0) (two
 * products a dimension and kv head where the max of two products per query head was
 * four); the same value as page_core.group_bounds' */
static inline void split_query(float *restrict positive, float *restrict negative,
                               const float *restrict query, int64_t q_heads, int64_t kv_heads,
                               int64_t dim) {
    const int64_t group = q_heads / kv_heads;
    for (int64_t i = 0; i < kv_heads * dim; i++) positive[i] = negative[i] = 0.0f;
    for (int64_t h = 0; h < q_heads; h++) {
        float *pos = positive + (h / group) * dim, *neg = negative + (h / group) * dim;
        const float *q = query + h * dim;
        for (int64_t d = 0; d < dim; d++) {
            pos[d] += q[d] > 0.0f ? q[d] : 0.0f;
            neg[d] += q[d] < 0.0f ? q[d] : 0.0f;
        }
    }
}

/* the largest q.k keys inside the box [low, high] can give, summed over one kv head's query
 * heads (Quest's bound; `positive` and `negative` that head's split_query) */
static inline float box_bound(const float *restrict positive, const float *restrict negative,
                              const float *restrict low, const float *restrict high,
                              int64_t dim) {
    float lane[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= dim; d += LANES)
        for (int j = 0; j < LANES; j++)
            lane[j] += positive[d + j] * high[d + j] + negative[d + j] * low[d + j];
    for (; d < dim; d++) lane[0] += positive[d] * high[d] + negative[d] * low[d];
    return lanes_total(lane);
}

/* asks the memory system for `bytes` from `start` ahead of their use (no effect on results):
 * the swap's rows lie scattered over MBs of cache and pages, cold after the step's weights
 * passed through, and read one after another each row's misses were waited for in turn.
 * Always inlined: GCC takes a function that only prefetches for one without effects and
 * drops its calls (measured: a swap's prefetches vanished) */
#define AVL_ALWAYS_INLINE static inline __attribute__((always_inline))

AVL_ALWAYS_INLINE void prefetch_bytes(const void *start, size_t bytes) {
    const char *at = (const char *)start;
    for (size_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(at + offset, 0, 3);
}

AVL_ALWAYS_INLINE void prefetch_bytes_to_write(void *start, size_t bytes) {
    char *at = (char *)start;
    for (size_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(at + offset, 1, 3);
}

/* the element-wise min and max of n rows of dim floats (+inf and -inf for none): LANES
 * columns at a time, held in registers over the rows, branch-free (a compare-and-branch
 * on random keys mispredicts) */
static inline void box_rows(float *restrict low, float *restrict high,
                            const float *const *rows, int64_t n, int64_t dim) {
    for (int64_t d0 = 0; d0 < dim; d0 += LANES) {
        int64_t width = dim - d0 < LANES ? dim - d0 : LANES;
        float lo[LANES], hi[LANES];
        for (int j = 0; j < LANES; j++) {
            lo[j] = INFINITY;
            hi[j] = -INFINITY;
        }
        if (width == LANES)
            for (int64_t i = 0; i < n; i++) {
                const float *restrict row = rows[i] + d0;
                for (int j = 0; j < LANES; j++) {
                    lo[j] = row[j] < lo[j] ? row[j] : lo[j];
                    hi[j] = row[j] > hi[j] ? row[j] : hi[j];
                }
            }
        else
            for (int64_t i = 0; i < n; i++)
                for (int64_t j = 0; j < width; j++) {
                    float v = rows[i][d0 + j];
                    lo[j] = v < lo[j] ? v : lo[j];
                    hi[j] = v > hi[j] ? v : hi[j];
                }
        for (int64_t j = 0; j < width; j++) {
            low[d0 + j] = lo[j];
            high[d0 + j] = hi[j];
        }
    }
}

/* how many entries of `ascending` are below `value` (searchsorted's left index): halving
 * steps that move the base by a select, not a branch (a branch per step on where a
 * position falls mispredicts half the time) */
static inline int64_t count_below(const int64_t *ascending, int64_t length, int64_t value) {
    if (length <= 0) return 0;
    const int64_t *base = ascending; /* the answer is in [base, base + n] */
    for (int64_t n = length; n > 1;) {
        const int64_t half = n / 2;
        base = base[half] < value ? base + half : base;
        n -= half;
    }
    return (base - ascending) + (*base < value);
}

/* the float's bits as an unsigned key in the float's order (-0 as +0: equal scores, equal
 * keys), so a choice by score is a choice by key */
static inline uint32_t ordered_key(float score) {
    score += 0.0f;
    uint32_t bits;
    memcpy(&bits, &score, sizeof bits);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

/* one int64 per candidate in the tie rule's order (budgets._rule_key): the float32 score's
 * bits made order-keeping (-0 as +0), then the position reversed (positions < 2**31) */
static inline uint64_t rule_key(float score, int64_t position) {
    return ((uint64_t)ordered_key(score) << 32) | (uint64_t)(0x7FFFFFFF - position);
}

/* the n-th largest (1-based, 1 <= n <= count) of distinct keys: a radix select, a byte at a
 * time from the top; after each byte only the keys that share the bytes chosen so far are
 * kept (in `scratch`, [count]) for the next, and once few are left they are ranked by an
 * insertion sort (a pass per byte clears and scans 256 counts however few keys are left) */
static inline uint64_t nth_largest_key(const uint64_t *keys, int64_t count, int64_t n,
                                       uint64_t *scratch) {
    uint64_t prefix = 0;
    const uint64_t *live = keys;
    for (int shift = 56; shift >= 0; shift -= 8) {
        if (count <= 16) { /* in place where live is the scratch: key i is read first */
            for (int64_t i = 0; i < count; i++) {
                uint64_t key = live[i];
                int64_t at = i;
                for (; at > 0 && scratch[at - 1] < key; at--) scratch[at] = scratch[at - 1];
                scratch[at] = key;
            }
            return scratch[n - 1];
        }
        int64_t histogram[256] = {0};
        for (int64_t i = 0; i < count; i++) histogram[(live[i] >> shift) & 255u]++;
        int digit = 255;
        for (; digit > 0 && n > histogram[digit]; digit--) n -= histogram[digit];
        prefix |= (uint64_t)digit << shift;
        int64_t kept = 0;
        for (int64_t i = 0; i < count; i++)
            if (((live[i] >> shift) & 255u) == (uint64_t)digit) scratch[kept++] = live[i];
        live = scratch, count = kept;
    }
    return prefix;
}

#endif
