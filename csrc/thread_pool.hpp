// A persistent pool of worker threads that runs index ranges in parallel; the calling
// thread takes part, so a one-worker call never changes threads.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tensorfile {

class ThreadPool {
 public:
  ThreadPool() = default;
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Calls fn(worker, i) for every i in [0, n), on at most `workers` threads; `worker` is a
  // slot in [0, workers) owned by one thread at a time (for per-worker buffers). Items
  // are taken in increasing order. The first exception stops further items from
  // starting, waits for those in flight, and is rethrown here. Safe to call from
  // several threads at once. Does not touch the GIL.
  void parallel_for(size_t n, size_t workers, const std::function<void(size_t, size_t)>& fn);

  size_t size() const;

 private:
  void grow(size_t nthreads);
  void worker_loop();

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  std::vector<std::thread> threads_;
  bool stopping_ = false;
};

// The process-wide pool used by every engine call.
ThreadPool& default_pool();

}  // namespace tensorfile
