// The CPU kernels of ``avl::recall_swap`` and ``avl::core_choice`` (schemas defined in
// native_recall_swap.py and native_core_choice.py): the graph's call goes through the
// dispatcher straight to the C code. A Python kernel calling the C code through ctypes
// cost ~8 us a swap and ~5 us a choice on top of the C work, per layer and decode step
// (docs/history.md, session 26).
//
// Built by lowering/native_build.py against the running torch's headers.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

extern "C" {
int avl_recall_swap(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t capacity,
                    int64_t dim, int64_t n_pages, int64_t page_size, int64_t recall_pages,
                    double scale, const float *query, float *keys, float *values, int8_t *role,
                    int64_t *position, const float *last_qk, int64_t *page_positions,
                    float *page_keys, float *page_values, float *page_low, float *page_high,
                    int64_t *image_ordinal, const int64_t *image_positions, int64_t n_image,
                    float *core_low, float *core_high, int64_t *members, int64_t n_core_pages,
                    int64_t core_page_size, const int64_t *chosen_in);

int avl_core_choice(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t capacity,
                    int64_t dim, int64_t n_pages, int64_t page_size, const float *query,
                    const float *low, const float *high, const float *page_bound,
                    const int64_t *image_ordinal, int8_t *role, const int64_t *position,
                    const int64_t *counters);
}

namespace {

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
        n_core, core_size, pointer_of<int64_t>(chosen));
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

}  // namespace

TORCH_LIBRARY_IMPL(avl, CPU, m) {
    m.impl("recall_swap", recall_swap);
    m.impl("core_choice", core_choice);
}
