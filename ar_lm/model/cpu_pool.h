// parallel_for for the XLA FFI handlers of ar_lm/model/cpu_kernels.py: tasks 0..n-1 over the calling thread and
// the threads of XLA's pool. Tasks are claimed from one counter, and the caller waits only for tasks that were
// claimed, so a pool task that runs late (or never) is harmless: it finds nothing left and touches no buffer.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ar_lm {

template <typename Fn>
struct Tasks {
  Fn fn;
  int64_t n;
  std::atomic<int64_t> next{0}, done{0};

  Tasks(Fn f, int64_t count) : fn(std::move(f)), n(count) {}

  void drain() {
    for (int64_t t; (t = next.fetch_add(1)) < n;) {
      fn(t);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// fn(task) for every task in [0, n); returns once all have run
template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, Fn fn) {
  auto tasks = std::make_shared<Tasks<Fn>>(std::move(fn), n);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([tasks] { tasks->drain(); });
  tasks->drain();
  while (tasks->done.load(std::memory_order_acquire) < n) {
  }
}

}  // namespace ar_lm
