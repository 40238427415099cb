// The pinned buffer cache, the CUDA device behind device.hpp and the backend table.
#include "device.hpp"

#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "errors.hpp"
#include "shim/cuda.hpp"

namespace tensorfile {

// --------------------------------------------------------------------------- pinned cache

void* Device::acquire_pinned(size_t nbytes) {
  void* p = nullptr;
  std::multimap<size_t, void*> stale;
  {
    std::lock_guard<std::mutex> lock(pinned_mutex_);
    auto it = cached_.find(nbytes);
    if (it != cached_.end()) {
      p = it->second;
      cached_.erase(it);
    } else {
      // The staging size changed: buffers of the old size would only sit there pinned.
      stale.swap(cached_);
    }
  }
  for (auto& kv : stale) free_pinned(kv.second);
  if (!p) p = alloc_pinned(nbytes);
  return p;
}

void Device::release_pinned(void* p, size_t nbytes) noexcept {
  if (!p) return;
  try {
    std::lock_guard<std::mutex> lock(pinned_mutex_);
    cached_.emplace(nbytes, p);
  } catch (...) {
    free_pinned(p);
  }
}

size_t Device::trim_pinned() noexcept {
  std::multimap<size_t, void*> drop;
  {
    std::lock_guard<std::mutex> lock(pinned_mutex_);
    drop.swap(cached_);
  }
  for (auto& kv : drop) free_pinned(kv.second);
  return drop.size();
}

// --------------------------------------------------------------------------- CUDA

namespace {

class CudaDevice final : public Device {
 public:
  explicit CudaDevice(int index) : index_(index) {}

  int bind() override {
    int previous = 0;
    cuda::check(cuda::api().GetDevice(&previous), "cudaGetDevice");
    if (previous != index_) cuda::check(cuda::api().SetDevice(index_), "cudaSetDevice");
    return previous;
  }
  void restore(int previous) noexcept override {
    // cudaSetDevice creates the device's primary context (hundreds of MiB) if it has
    // none; a thread whose current device is the default 0 may never have used it.
    if (previous == index_ || cuda::primary_context_active(previous) == 0) return;
    cuda::api().SetDevice(previous);
  }

  void* create_stream() override {
    cuda::Stream s = nullptr;
    cuda::check(cuda::api().StreamCreateWithFlags(&s, cuda::kStreamNonBlocking), "cudaStreamCreateWithFlags");
    return s;
  }
  void destroy_stream(void* stream) noexcept override { cuda::api().StreamDestroy(stream); }

  void* create_event() override {
    cuda::Event e = nullptr;
    // Blocking sync: up to one waiting worker per thread would otherwise spin at full
    // CPU, taking cores from the reads, checksums and writes.
    cuda::check(cuda::api().EventCreateWithFlags(&e, cuda::kEventBlockingSync | cuda::kEventDisableTiming),
                "cudaEventCreateWithFlags");
    return e;
  }
  void destroy_event(void* event) noexcept override { cuda::api().EventDestroy(event); }

  void copy_async(void* dst, const void* src, size_t nbytes, CopyKind kind, void* stream) override {
    int k = kind == CopyKind::kHostToDevice ? cuda::kMemcpyHostToDevice : cuda::kMemcpyDeviceToHost;
    cuda::check(cuda::api().MemcpyAsync(dst, src, nbytes, k, stream), "cudaMemcpyAsync");
  }
  void record(void* event, void* stream) override {
    cuda::check(cuda::api().EventRecord(event, stream), "cudaEventRecord");
  }
  bool query(void* event) override {
    int code = cuda::api().EventQuery(event);
    if (code == cuda::kErrorNotReady) return false;
    cuda::check(code, "cudaEventQuery");
    return true;
  }
  void wait(void* event) override { cuda::check(cuda::api().EventSynchronize(event), "cudaEventSynchronize"); }
  // Through a blocking-sync event: cudaStreamSynchronize spins under the default
  // scheduling policy.
  void synchronize(void* stream) override {
    void* e = create_event();
    try {
      record(e, stream);
      wait(e);
    } catch (...) {
      destroy_event(e);
      throw;
    }
    destroy_event(e);
  }

 protected:
  void* alloc_pinned(size_t nbytes) override {
    void* p = nullptr;
    // Portable: a buffer cached by one device's transfer may serve another device's.
    cuda::check(cuda::api().HostAlloc(&p, nbytes, cuda::kHostAllocPortable), "cudaHostAlloc");
    return p;
  }
  void free_pinned(void* p) noexcept override { cuda::api().FreeHost(p); }

 private:
  int index_;
};

}  // namespace

Device& cuda_device(int index) {
  static std::mutex mutex;
  static auto* devices = new std::map<int, std::unique_ptr<CudaDevice>>();  // leaked, like the pool
  cuda::api();                                                              // throws when the runtime is missing
  std::lock_guard<std::mutex> lock(mutex);
  auto& d = (*devices)[index];
  if (!d) d = std::make_unique<CudaDevice>(index);
  return *d;
}

// --------------------------------------------------------------------------- backends

namespace {

std::mutex g_backends_mutex;
// In order of registration, for the error message; a handful of entries.
std::vector<std::pair<std::string, DeviceFactory>>& backends() {
  static auto* table = new std::vector<std::pair<std::string, DeviceFactory>>{{"cuda", &cuda_device}};
  return *table;
}

}  // namespace

void register_backend(const std::string& name, DeviceFactory factory) {
  std::lock_guard<std::mutex> lock(g_backends_mutex);
  for (auto& entry : backends()) {
    if (entry.first == name) {
      entry.second = factory;
      return;
    }
  }
  backends().emplace_back(name, factory);
}

Device& find_device(const std::string& backend, int index) {
  DeviceFactory factory = nullptr;
  std::string names;
  {
    std::lock_guard<std::mutex> lock(g_backends_mutex);
    const auto& table = backends();
    for (size_t i = 0; i < table.size(); i++) {
      if (table[i].first == backend) factory = table[i].second;
      names += (i == 0 ? "" : (i + 1 == table.size() ? " or " : ", ")) + ("'" + table[i].first + "'");
    }
  }
  if (!factory) throw std::invalid_argument("backend must be " + names + ", got '" + backend + "'");
  return factory(index);
}

}  // namespace tensorfile
