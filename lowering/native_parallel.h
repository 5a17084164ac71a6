/* How the C kernels hand independent parts of their work to threads without torch headers:
 * the torch binding (torch_kernels.cpp) passes a runner over at::parallel_for; a NULL
 * runner means one thread. Shared by the C sources and the binding. */

#ifndef AVL_NATIVE_PARALLEL_H
#define AVL_NATIVE_PARALLEL_H

#include <stdint.h>

/* does parts [begin, end) of the work ``context`` describes */
typedef void (*avl_parallel_body)(void *context, int64_t begin, int64_t end);
/* calls ``body`` on ranges that cover [0, count) once, on any threads */
typedef void (*avl_parallel_runner)(avl_parallel_body body, void *context, int64_t count);

#endif
