/* The arguments of avl_prefill_rows (prefill_rows.c), shared with its torch binding
 * (torch_kernels.cpp). Shapes: B batch rows, Hq query and Hkv key/value heads, Lq query
 * rows, Lk keys, D head width, C slots. Float tensors are float32; strides are in floats and
 * the last dimension is contiguous. Bool tensors are one byte per entry. */

#ifndef AVL_PREFILL_ROWS_H
#define AVL_PREFILL_ROWS_H

#include <stdint.h>

#include "native_parallel.h"

/* per batch row, the columns of the layout's int64 plan [B, PLAN_COLUMNS] */
enum {
    PLAN_CANDIDATES, /* image positions the secondary set is chosen from */
    PLAN_CORE,       /* n_core */
    PLAN_SECONDARY,  /* n_secondary */
    PLAN_SINK,       /* positions before the first image */
    PLAN_OTHERS_END, /* slot bounds (PromptLayout.bounds) */
    PLAN_CORE_START,
    PLAN_IMAGE_END,
    PLAN_TEXT_START,
    PLAN_TEXT_END,
    PLAN_OVER,  /* the text is over its budget: recent + heavy hitters, else every slot */
    PLAN_HEAVY, /* heavy hitters kept where over */
    PLAN_COLUMNS
};

typedef struct {
    int64_t batch, q_heads, kv_heads, q_len, k_len, dim, capacity;
    double scale;
    /* the prefill's query [B, Hq, Lq, D], keys and values [B, Hkv, Lk, D] (strides b, h, l) */
    const float *query, *keys, *values;
    int64_t query_stride[3], keys_stride[3], values_stride[3];
    /* [B, Hq, Lq] the attention's log-sum-exp (strides b, h, l: the flash kernel's is
     * [B, Lq, Hq] inside, and a contiguous copy cost more than these reads) */
    const float *lse;
    int64_t lse_stride[3];

    /* the prompt's layout (policies/avl_layout.PromptLayout), packed once per prompt */
    const int64_t *plan;       /* [B, PLAN_COLUMNS] */
    const int64_t *candidates; /* [B, candidate_width] ascending, padded */
    int64_t candidate_width;
    const int64_t *sink; /* [B, sink_width] ascending, padded */
    int64_t sink_width;
    const uint8_t *text_slots; /* [B, Hkv, Lk] H2O's candidates */
    const uint8_t *recent;     /* [B, Hkv, Lk] the recent share (where over) */
    const int64_t *text_rank;  /* [B, Hkv, Lk] */
    const uint8_t *not_text;   /* [B, C] */
    const uint8_t *image_slot; /* [B, C] */
    const int64_t *image_positions; /* [B, n_image] ascending, padded past every position */
    int64_t n_image;
    const uint8_t *query_valid; /* [B, Lq] */
    /* the image score: the last `window` query rows' bias over every key,
     * [B or 1, window, Lk] (last_bias_batch: 0 where shared by the rows) */
    int64_t window;
    const float *last_bias;
    int64_t last_bias_batch;
    /* the text columns' sums: query rows first_row.. , their bias over the columns,
     * [B or 1, Lq - first_row, n_columns] */
    const int64_t *columns;
    int64_t n_columns, first_row;
    const float *column_bias;
    int64_t column_bias_batch;

    /* recall's pages (recall_page_size 0: none) and the query-aware core's (0: none) */
    int64_t recall_page_size, recall_n_pages;
    int64_t core_page_size, core_n_pages;

    /* outputs, every one written whole */
    int64_t *position;              /* [B, Hkv, C] */
    float *slot_keys, *slot_values; /* [B, Hkv, C, D] */
    int64_t *slot_text_rank;        /* [B, Hkv, C] */
    float *slot_text_score;         /* [B, Hkv, C] */
    float *last_qk;                 /* [B, C] (recall) */
    int64_t *page_positions;        /* [B, recall_n_pages, recall_page_size] */
    float *page_keys, *page_values; /* [B, Hkv, recall_n_pages, recall_page_size, D] */
    float *page_low, *page_high;    /* [B, Hkv, recall_n_pages, D] */
    int64_t *image_ordinal;         /* [B, C] (the core's pages) */
    float *core_low, *core_high;    /* [B, Hkv, core_n_pages, D] */
    int64_t *members;               /* [B, core_n_pages, core_page_size] */
} PrefillRowsArgs;

/* Returns 0, or -1 where scratch memory could not be had. `run` hands the batch rows, then
 * the (batch row, kv head) pairs, to threads (NULL: the caller's thread). */
int avl_prefill_rows(const PrefillRowsArgs *args, avl_parallel_runner run);

#endif
