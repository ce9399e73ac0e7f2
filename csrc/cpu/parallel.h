// The one work-sharing helper of the CPU kernels.
//
// Items are handed out one at a time from a shared counter to the calling thread and to
// helpers from the inter-op pool, and the caller waits only for helpers that have
// claimed an item. A fork-join region (at::parallel_for, OpenMP) waits for every thread
// to be scheduled, and a static share per thread stays with a thread the OS has
// descheduled: on the reference CPU under load (load average ~7) a 4M-element sum took
// 32 ms with two threads against 6.5 ms with one, center_region_assign with its
// fork-join regions ~110 ms against ~8 ms, and matrix NMS at N = 500 48-64 ms against
// 10 ms. Here a busy machine degrades to the one-thread time.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <functional>
#include <memory>
#include <thread>

namespace solo_fast {
namespace cpu {

// The work below which a kernel's region stays on the calling thread: ``default_work``
// (each kernel's own, from its cost per item), or SOLO_FAST_CPU_PARALLEL_WORK (tests set 0
// to run every region on all threads; read at each call, so a test can set it).
inline int64_t parallel_work(int64_t default_work) {
  const char* env = std::getenv("SOLO_FAST_CPU_PARALLEL_WORK");
  return env ? std::strtoll(env, nullptr, 10) : default_work;
}

namespace detail {
// Lives as long as the last helper: a helper may start after the call has returned, so
// it reaches the caller's `body` only after claiming an item, which the caller waits for.
struct SharedWork {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> busy{0};
  int64_t count = 0;
  std::function<void(int64_t)> body;

  void drain() {
    ++busy;
    for (int64_t i = next++; i < count; i = next++) body(i);
    --busy;
  }
};
}  // namespace detail

// body(i) for every i in [0, count), on up to at::get_num_threads() threads when
// `parallel` (callers pass false when waking a helper would cost more than the work).
template <class F>
void parallel_dynamic(int64_t count, bool parallel, const F& body) {
  const int64_t helpers = parallel ? std::min<int64_t>(at::get_num_threads(), count) - 1 : 0;
  if (helpers <= 0) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  auto work = std::make_shared<detail::SharedWork>();
  work->count = count;
  work->body = [&body](int64_t i) { body(i); };
  for (int64_t h = 0; h < helpers; ++h) at::launch([work] { work->drain(); });
  work->drain();
  while (work->busy.load() != 0) std::this_thread::yield();
}

}  // namespace cpu
}  // namespace solo_fast
