// The CPU kernels of ``avl::recall_swap``, ``avl::core_choice`` and ``avl::prefill_rows``
// (schemas defined in native_recall_swap.py, native_core_choice.py and
// native_prefill_rows.py): an op's call goes through the dispatcher straight to the C code. A Python kernel calling the C code through ctypes
// cost ~8 us a swap and ~5 us a choice on top of the C work, per layer and decode step
// (docs/history.md, session 26).
//
// Built by lowering/native_build.py against the running torch's headers.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

extern "C" {
#include "native_parallel.h"
#include "prefill_rows.h"

int avl_recall_swap(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t capacity,
                    int64_t dim, int64_t n_pages, int64_t page_size, int64_t recall_pages,
                    double scale, const float *query, float *keys, float *values, int8_t *role,
                    int64_t *position, const float *last_qk, int64_t *page_positions,
                    float *page_keys, float *page_values, float *page_low, float *page_high,
                    int64_t *image_ordinal, const int64_t *image_positions, int64_t n_image,
                    float *core_low, float *core_high, int64_t *members, int64_t n_core_pages,
                    int64_t core_page_size, const int64_t *chosen_in,
                    avl_parallel_runner run_heads);

int avl_core_choice(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t capacity,
                    int64_t dim, int64_t n_pages, int64_t page_size, const float *query,
                    const float *low, const float *high, const float *page_bound,
                    const int64_t *image_ordinal, int8_t *role, const int64_t *position,
                    const int64_t *counters);
}

namespace {

// the C kernels' independent parts on torch's intra-op threads (one thread where torch has
// one)
void run_on_torch_threads(avl_parallel_body body, void *context, int64_t count) {
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) { body(context, begin, end); });
}

template <typename T>
T *pointer_of(const std::optional<at::Tensor> &tensor) {
    return tensor.has_value() ? tensor->data_ptr<T>() : nullptr;
}

void recall_swap(const at::Tensor &query, const at::Tensor &keys, const at::Tensor &values,
                 const at::Tensor &role, const at::Tensor &position, const at::Tensor &last_qk,
                 const at::Tensor &page_positions, const at::Tensor &page_keys,
                 const at::Tensor &page_values, const at::Tensor &page_low,
                 const at::Tensor &page_high, const std::optional<at::Tensor> &image_ordinal,
                 const std::optional<at::Tensor> &image_positions,
                 const std::optional<at::Tensor> &core_low,
                 const std::optional<at::Tensor> &core_high,
                 const std::optional<at::Tensor> &members,
                 const std::optional<at::Tensor> &chosen, int64_t recall_pages, double scale) {
    const int64_t n_pages = page_positions.size(1);
    const int64_t n_image = image_positions.has_value() ? image_positions->size(1) : 0;
    const int64_t n_core = members.has_value() ? members->size(1) : 0;
    const int64_t core_size = members.has_value() ? members->size(2) : 0;
    const int status = avl_recall_swap(
        query.size(0), query.size(1), keys.size(1), keys.size(2), query.size(2), n_pages,
        page_positions.size(2), std::min(recall_pages, n_pages), scale,
        query.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(),
        role.data_ptr<int8_t>(), position.data_ptr<int64_t>(), last_qk.data_ptr<float>(),
        page_positions.data_ptr<int64_t>(), page_keys.data_ptr<float>(),
        page_values.data_ptr<float>(), page_low.data_ptr<float>(), page_high.data_ptr<float>(),
        pointer_of<int64_t>(image_ordinal), pointer_of<int64_t>(image_positions), n_image,
        pointer_of<float>(core_low), pointer_of<float>(core_high), pointer_of<int64_t>(members),
        n_core, core_size, pointer_of<int64_t>(chosen), run_on_torch_threads);
    TORCH_CHECK(status == 0, "avl::recall_swap: no memory for the swap's scratch rows");
}

void core_choice(const at::Tensor &query, const at::Tensor &low, const at::Tensor &high,
                 const std::optional<at::Tensor> &page_bound, const at::Tensor &image_ordinal,
                 const at::Tensor &role, const at::Tensor &position, const at::Tensor &counters,
                 int64_t page_size) {
    const at::Tensor query_rows = query.contiguous();  // a graph may hand over a view
    std::optional<at::Tensor> bound;
    if (page_bound.has_value()) bound = page_bound->contiguous();
    const int status = avl_core_choice(
        query_rows.size(0), query_rows.size(1), low.size(1), role.size(1), query_rows.size(2),
        low.size(2), page_size, query_rows.data_ptr<float>(), low.data_ptr<float>(),
        high.data_ptr<float>(), pointer_of<float>(bound), image_ordinal.data_ptr<int64_t>(),
        role.data_ptr<int8_t>(), position.data_ptr<int64_t>(), counters.data_ptr<int64_t>());
    TORCH_CHECK(status == 0, "avl::core_choice: no memory for its scratch");
}

template <typename T>
const T *bytes_of(const at::Tensor &tensor) {  // a bool tensor's entries, one byte each
    return reinterpret_cast<const T *>(tensor.data_ptr());
}

void strides_of(const at::Tensor &tensor, int64_t *stride) {
    TORCH_CHECK(tensor.stride(3) == 1, "avl::prefill_rows: rows must be contiguous");
    for (int i = 0; i < 3; i++) stride[i] = tensor.stride(i);
}

// a contiguous tensor's copy: a memcpy, without clone's dispatch and iterator (four of these
// a layer cost ~19 us inside a prefill on ``cpu-host``)
at::Tensor copy_of(const at::Tensor &tensor) {
    TORCH_CHECK(tensor.is_contiguous(), "avl::prefill_rows: the layout's state must be contiguous");
    at::Tensor copy = at::empty(tensor.sizes(), tensor.options());
    std::memcpy(copy.data_ptr(), tensor.data_ptr(), tensor.nbytes());
    return copy;
}

using Rows = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                        at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                        at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                        at::Tensor>;

// every output allocated here (one call, no Python between): absent parts (recall or the
// core's pages off) come back empty
Rows prefill_rows(const at::Tensor &query, const at::Tensor &keys, const at::Tensor &values,
                  const at::Tensor &lse, const at::Tensor &plan, const at::Tensor &candidates,
                  const at::Tensor &sink, const at::Tensor &text_slots, const at::Tensor &recent,
                  const at::Tensor &text_rank, const at::Tensor &not_text,
                  const at::Tensor &image_slot, const at::Tensor &image_positions,
                  const at::Tensor &query_valid, const at::Tensor &last_bias,
                  const at::Tensor &columns, const at::Tensor &column_bias, int64_t first_row,
                  double scale, int64_t capacity, int64_t recall_page_size,
                  int64_t recall_n_pages, int64_t core_page_size, int64_t core_n_pages,
                  const at::Tensor &role, const at::Tensor &counters,
                  const at::Tensor &text_options) {
    const int64_t batch = query.size(0), kv_heads = keys.size(1), dim = query.size(3);
    PrefillRowsArgs a{};
    a.batch = batch, a.q_heads = query.size(1), a.kv_heads = kv_heads;
    a.q_len = query.size(2), a.k_len = keys.size(2), a.dim = dim, a.capacity = capacity;
    a.scale = scale;
    a.query = query.data_ptr<float>(), a.keys = keys.data_ptr<float>();
    a.values = values.data_ptr<float>(), a.lse = lse.data_ptr<float>();
    strides_of(query, a.query_stride), strides_of(keys, a.keys_stride);
    strides_of(values, a.values_stride);
    for (int i = 0; i < 3; i++) a.lse_stride[i] = lse.stride(i);
    a.plan = plan.data_ptr<int64_t>();
    a.candidates = candidates.data_ptr<int64_t>(), a.candidate_width = candidates.size(1);
    a.sink = sink.data_ptr<int64_t>(), a.sink_width = sink.size(1);
    a.text_slots = bytes_of<uint8_t>(text_slots), a.recent = bytes_of<uint8_t>(recent);
    a.text_rank = text_rank.data_ptr<int64_t>();
    a.not_text = bytes_of<uint8_t>(not_text), a.image_slot = bytes_of<uint8_t>(image_slot);
    a.image_positions = image_positions.data_ptr<int64_t>();
    a.n_image = image_positions.size(1);
    a.query_valid = bytes_of<uint8_t>(query_valid);
    a.window = last_bias.size(1), a.last_bias = last_bias.data_ptr<float>();
    a.last_bias_batch = last_bias.size(0) > 1;
    a.columns = columns.data_ptr<int64_t>(), a.n_columns = columns.numel();
    a.first_row = first_row, a.column_bias = column_bias.data_ptr<float>();
    a.column_bias_batch = column_bias.size(0) > 1;
    a.recall_page_size = recall_page_size, a.recall_n_pages = recall_n_pages;
    a.core_page_size = core_page_size, a.core_n_pages = core_n_pages;

    const auto longs = query.options().dtype(at::kLong), floats = query.options();
    const int64_t recall = recall_page_size ? 1 : 0, core = core_page_size ? 1 : 0;
    at::Tensor position = at::empty({batch, kv_heads, capacity}, longs);
    at::Tensor slot_keys = at::empty({batch, kv_heads, capacity, dim}, floats);
    at::Tensor slot_values = at::empty({batch, kv_heads, capacity, dim}, floats);
    at::Tensor slot_text_rank = at::empty({batch, kv_heads, capacity}, longs);
    at::Tensor slot_text_score = at::empty({batch, kv_heads, capacity}, floats);
    at::Tensor last_qk = at::empty({batch, capacity * recall}, floats);
    const int64_t pages = recall_n_pages * recall, size = recall_page_size;
    at::Tensor page_positions = at::empty({batch, pages, size}, longs);
    at::Tensor page_keys = at::empty({batch, kv_heads, pages, size, dim}, floats);
    at::Tensor page_values = at::empty({batch, kv_heads, pages, size, dim}, floats);
    at::Tensor page_low = at::empty({batch, kv_heads, pages, dim}, floats);
    at::Tensor page_high = at::empty({batch, kv_heads, pages, dim}, floats);
    const int64_t core_pages = core_n_pages * core;
    at::Tensor image_ordinal = at::empty({batch, capacity * core}, longs);
    at::Tensor core_low = at::empty({batch, kv_heads, core_pages, dim}, floats);
    at::Tensor core_high = at::empty({batch, kv_heads, core_pages, dim}, floats);
    at::Tensor members = at::empty({batch, core_pages, core_page_size}, longs);
    a.position = position.data_ptr<int64_t>();
    a.slot_keys = slot_keys.data_ptr<float>(), a.slot_values = slot_values.data_ptr<float>();
    a.slot_text_rank = slot_text_rank.data_ptr<int64_t>();
    a.slot_text_score = slot_text_score.data_ptr<float>();
    a.last_qk = last_qk.data_ptr<float>(), a.page_positions = page_positions.data_ptr<int64_t>();
    a.page_keys = page_keys.data_ptr<float>(), a.page_values = page_values.data_ptr<float>();
    a.page_low = page_low.data_ptr<float>(), a.page_high = page_high.data_ptr<float>();
    a.image_ordinal = image_ordinal.data_ptr<int64_t>();
    a.core_low = core_low.data_ptr<float>(), a.core_high = core_high.data_ptr<float>();
    a.members = members.data_ptr<int64_t>();
    TORCH_CHECK(avl_prefill_rows(&a, run_on_torch_threads) == 0,
                "avl::prefill_rows: no memory for its scratch");
    // the decode state's own copies (the layout's are shared by the layers), and the last
    // query row, contiguous whatever the projection's layout
    at::Tensor last_query = at::empty({batch, a.q_heads, dim}, floats);
    float *last_rows = last_query.data_ptr<float>();
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < a.q_heads; h++)
            std::memcpy(last_rows + (b * a.q_heads + h) * dim,
                        a.query + b * a.query_stride[0] + h * a.query_stride[1] +
                            (a.q_len - 1) * a.query_stride[2],
                        sizeof(float) * dim);
    return {position, slot_keys, slot_values, slot_text_rank, slot_text_score, last_qk,
            page_positions, page_keys, page_values, page_low, page_high, image_ordinal,
            core_low, core_high, members, copy_of(role), copy_of(counters),
            copy_of(text_options), last_query};
}

}  // namespace

TORCH_LIBRARY_IMPL(avl, CPU, m) {
    m.impl("recall_swap", recall_swap);
    m.impl("core_choice", core_choice);
    m.impl("prefill_rows", prefill_rows);
}
