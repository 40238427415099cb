// The simulated device (see sim_device.hpp).
#include "testing/sim_device.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>

#include "errors.hpp"

namespace tensorfile::testing {

namespace {

std::atomic<int64_t> g_pinned_live{0}, g_pinned_in_use{0}, g_pinned_peak{0}, g_streams_live{0}, g_events_live{0},
    g_threads_live{0}, g_dev_live{0}, g_copies{0};
std::atomic<uint64_t> g_fault_countdown{0}, g_delay_us{0};

std::mutex g_mem_mutex;
std::map<uintptr_t, size_t> g_device_mem;  // base -> nbytes
std::map<uintptr_t, size_t> g_pinned_mem;

bool inside(const std::map<uintptr_t, size_t>& m, uintptr_t p, size_t nbytes) {
  auto it = m.upper_bound(p);
  if (it == m.begin()) return false;
  --it;
  return p >= it->first && p - it->first <= it->second && nbytes <= it->second - (p - it->first);
}

// A fault that a real device would report asynchronously (cudaErrorIllegalAddress et al.).
[[noreturn]] void throw_sim_fault(const char* call) {
  throw CudaError(call, "cudaErrorSimulatedFault",
                  std::string(call) + " failed: cudaErrorSimulatedFault (an injected copy failure)");
}

struct SimStream {
  std::thread thread;
  std::mutex mutex;
  std::condition_variable cv;
  std::deque<std::function<void()>> queue;
  size_t running = 0;
  bool stopping = false;
  bool failed = false;  // sticky, as CUDA's errors are

  SimStream() {
    thread = std::thread([this] { loop(); });
    ++g_threads_live;
  }
  ~SimStream() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stopping = true;
    }
    cv.notify_all();
    thread.join();
    --g_threads_live;
  }
  void push(std::function<void()> op) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      queue.push_back(std::move(op));
    }
    cv.notify_all();
  }
  void drain() {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [this] { return queue.empty() && running == 0; });
  }
  void loop() {
    std::unique_lock<std::mutex> lock(mutex);
    for (;;) {
      cv.wait(lock, [this] { return stopping || !queue.empty(); });
      if (queue.empty()) return;  // stopping, and drained
      auto op = std::move(queue.front());
      queue.pop_front();
      running++;
      lock.unlock();
      op();
      lock.lock();
      running--;
      cv.notify_all();
    }
  }
};

struct SimEvent {
  std::mutex mutex;
  std::condition_variable cv;
  uint64_t recorded = 0, completed = 0;
  bool failed = false;
};

class SimDevice final : public Device {
 public:
  int bind() override { return 0; }
  void restore(int) noexcept override {}

  void* acquire_pinned(size_t nbytes) override {
    void* p = Device::acquire_pinned(nbytes);
    int64_t now = ++g_pinned_in_use;
    int64_t peak = g_pinned_peak.load();
    while (now > peak && !g_pinned_peak.compare_exchange_weak(peak, now)) {
    }
    return p;
  }
  void release_pinned(void* p, size_t nbytes) noexcept override {
    if (p) --g_pinned_in_use;
    Device::release_pinned(p, nbytes);
  }

  void* create_stream() override {
    auto* s = new SimStream();
    ++g_streams_live;
    return s;
  }
  void destroy_stream(void* stream) noexcept override {
    delete static_cast<SimStream*>(stream);  // runs what is queued, then joins
    --g_streams_live;
  }
  void* create_event() override {
    ++g_events_live;
    return new SimEvent();
  }
  void destroy_event(void* event) noexcept override {
    delete static_cast<SimEvent*>(event);
    --g_events_live;
  }

  void copy_async(void* dst, const void* src, size_t nbytes, CopyKind kind, void* stream) override {
    {
      // A real copy from pageable memory would silently serialise; a copy to or from
      // an address the device does not own would fault. Both are bugs here.
      std::lock_guard<std::mutex> lock(g_mem_mutex);
      auto host = reinterpret_cast<uintptr_t>(kind == CopyKind::kHostToDevice ? src : dst);
      auto dev = reinterpret_cast<uintptr_t>(kind == CopyKind::kHostToDevice ? dst : src);
      if (!inside(g_pinned_mem, host, nbytes)) {
        throw std::invalid_argument("simulated cudaMemcpyAsync: the host side is not pinned staging memory");
      }
      if (!inside(g_device_mem, dev, nbytes)) {
        throw std::invalid_argument("simulated cudaMemcpyAsync: the device side is outside every device allocation");
      }
    }
    auto* s = static_cast<SimStream*>(stream);
    s->push([s, dst, src, nbytes] {
      uint64_t delay = g_delay_us.load();
      if (delay) std::this_thread::sleep_for(std::chrono::microseconds(delay));
      uint64_t c = g_fault_countdown.load();
      while (c > 0 && !g_fault_countdown.compare_exchange_weak(c, c - 1)) {
      }
      if (c == 1 || s->failed) {
        s->failed = true;
        return;
      }
      std::memcpy(dst, src, nbytes);
      ++g_copies;
    });
  }

  void record(void* event, void* stream) override {
    auto* e = static_cast<SimEvent*>(event);
    auto* s = static_cast<SimStream*>(stream);
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lock(e->mutex);
      gen = ++e->recorded;
    }
    s->push([e, s, gen] {
      std::lock_guard<std::mutex> lock(e->mutex);
      if (gen > e->completed) e->completed = gen;
      e->failed = s->failed;
      e->cv.notify_all();
    });
  }
  bool query(void* event) override {
    auto* e = static_cast<SimEvent*>(event);
    std::lock_guard<std::mutex> lock(e->mutex);
    if (e->completed < e->recorded) return false;
    if (e->failed) throw_sim_fault("cudaEventQuery");
    return true;
  }
  void wait(void* event) override {
    auto* e = static_cast<SimEvent*>(event);
    std::unique_lock<std::mutex> lock(e->mutex);
    e->cv.wait(lock, [e] { return e->completed >= e->recorded; });
    if (e->failed) throw_sim_fault("cudaEventSynchronize");
  }
  void synchronize(void* stream) override {
    auto* s = static_cast<SimStream*>(stream);
    s->drain();
    if (s->failed) throw_sim_fault("cudaStreamSynchronize");
  }

 protected:
  void* alloc_pinned(size_t nbytes) override {
    void* p = std::malloc(nbytes ? nbytes : 1);
    if (!p) throw std::bad_alloc();
    std::lock_guard<std::mutex> lock(g_mem_mutex);
    g_pinned_mem[reinterpret_cast<uintptr_t>(p)] = nbytes;
    ++g_pinned_live;
    return p;
  }
  void free_pinned(void* p) noexcept override {
    {
      std::lock_guard<std::mutex> lock(g_mem_mutex);
      g_pinned_mem.erase(reinterpret_cast<uintptr_t>(p));
    }
    std::free(p);
    --g_pinned_live;
  }
};

}  // namespace

Device& sim_device() {
  static SimDevice* d = new SimDevice();  // leaked, like the pool
  return *d;
}

void register_sim_backend() {
  register_backend("sim", [](int) -> Device& { return sim_device(); });
}

SimCounters sim_counters() {
  SimCounters c;
  c.pinned_live = g_pinned_live.load();
  c.pinned_in_use = g_pinned_in_use.load();
  c.pinned_peak = g_pinned_peak.load();
  c.streams_live = g_streams_live.load();
  c.events_live = g_events_live.load();
  c.threads_live = g_threads_live.load();
  c.device_allocs_live = g_dev_live.load();
  c.copies = g_copies.load();
  return c;
}

void sim_reset_peak() {
  g_pinned_peak.store(g_pinned_in_use.load());
  g_copies.store(0);
}

void sim_configure(uint64_t copy_fault_countdown, uint64_t delay_us) {
  g_fault_countdown.store(copy_fault_countdown);
  g_delay_us.store(delay_us);
}

uintptr_t sim_alloc(size_t nbytes) {
  void* p = std::calloc(nbytes ? nbytes : 1, 1);
  if (!p) throw std::bad_alloc();
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  g_device_mem[reinterpret_cast<uintptr_t>(p)] = nbytes;
  ++g_dev_live;
  return reinterpret_cast<uintptr_t>(p);
}

void sim_free(uintptr_t ptr) {
  {
    std::lock_guard<std::mutex> lock(g_mem_mutex);
    if (!g_device_mem.erase(ptr)) throw std::invalid_argument("sim_free: not a simulated device allocation");
  }
  std::free(reinterpret_cast<void*>(ptr));
  --g_dev_live;
}

void sim_read(uintptr_t ptr, void* dst, size_t nbytes) {
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  if (!inside(g_device_mem, ptr, nbytes)) throw std::invalid_argument("sim_read: outside every device allocation");
  std::memcpy(dst, reinterpret_cast<const void*>(ptr), nbytes);
}

void sim_write(uintptr_t ptr, const void* src, size_t nbytes) {
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  if (!inside(g_device_mem, ptr, nbytes)) throw std::invalid_argument("sim_write: outside every device allocation");
  std::memcpy(reinterpret_cast<void*>(ptr), src, nbytes);
}

}  // namespace tensorfile::testing
