// The serial Parallel: what the standalone tests and any single-threaded caller use.
#include "kernels.h"

namespace graphopt {
namespace {

void run_serially(const Parallel& /*self*/, size_t n, void (*fn)(void* arg, size_t i), void* arg) {
  for (size_t i = 0; i < n; ++i) fn(arg, i);
}

}  // namespace

Parallel serial_parallel() { return Parallel{&run_serially, nullptr, 1}; }

}  // namespace graphopt
