// ThreadPool: a queue of helper jobs served by threads created on first need.
#include "thread_pool.hpp"

#include <atomic>
#include <exception>
#include <memory>

namespace tensorfile {

namespace {

struct ForState {
  const std::function<void(size_t, size_t)>* fn;
  size_t n;
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mutex;
  std::condition_variable done_cv;
  size_t helpers_running;
  std::exception_ptr error;

  void run(size_t worker) {
    for (;;) {
      if (failed.load(std::memory_order_relaxed)) return;
      size_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;
      try {
        (*fn)(worker, i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!error) error = std::current_exception();
        failed.store(true, std::memory_order_relaxed);
        return;
      }
    }
  }
};

}  // namespace

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
}

size_t ThreadPool::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return threads_.size();
}

void ThreadPool::grow(size_t nthreads) {
  std::lock_guard<std::mutex> lock(mutex_);
  while (threads_.size() < nthreads) threads_.emplace_back([this] { worker_loop(); });
}

void ThreadPool::worker_loop() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_ && queue_.empty()) return;
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    job();
  }
}

void ThreadPool::parallel_for(size_t n, size_t workers, const std::function<void(size_t, size_t)>& fn) {
  if (n == 0) return;
  if (workers == 0) workers = 1;
  if (workers > n) workers = n;
  auto state = std::make_shared<ForState>();
  state->fn = &fn;
  state->n = n;
  state->helpers_running = workers - 1;
  if (workers > 1) {
    grow(workers - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t w = 1; w < workers; w++) {
        queue_.emplace_back([state, w] {
          state->run(w);
          std::lock_guard<std::mutex> l(state->mutex);
          if (--state->helpers_running == 0) state->done_cv.notify_all();
        });
      }
    }
    cv_.notify_all();
  }
  state->run(0);
  {
    // Helpers hold a pointer to fn, so wait for every one of them, started or not.
    std::unique_lock<std::mutex> lock(state->mutex);
    state->done_cv.wait(lock, [&] { return state->helpers_running == 0; });
  }
  if (state->error) std::rethrow_exception(state->error);
}

ThreadPool& default_pool() {
  // Leaked on purpose: joining threads from a static destructor at interpreter exit
  // can deadlock.
  static ThreadPool* pool = new ThreadPool();
  return *pool;
}

}  // namespace tensorfile
