// A small device interface (pinned host buffers, streams, events, async copies), the CUDA
// device behind it (through the runtime shim), and the table that finds a device by its
// backend's name, where other backends (a simulation, for tests) can be added.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace tensorfile {

enum class CopyKind { kHostToDevice, kDeviceToHost };

// Every method may throw CudaError; the ones marked noexcept release and never fail
// loudly. Streams and events belong to the thread that created them until destroyed.
class Device {
 public:
  virtual ~Device() = default;

  // Makes this device current on the calling thread (CUDA's current device is per
  // thread) and returns the device that was current, for restore().
  virtual int bind() = 0;
  // Makes `previous` current again on a caller's thread (Python's, torch's current
  // device), unless that would create a context on a device this process has not used:
  // then the thread stays on this device, as torch's own device guard leaves it.
  // Worker threads never call it, so they create no context beyond this device's.
  virtual void restore(int previous) noexcept = 0;
  virtual void* create_stream() = 0;
  virtual void destroy_stream(void* stream) noexcept = 0;
  // An event whose wait() blocks the thread without spinning.
  virtual void* create_event() = 0;
  virtual void destroy_event(void* event) noexcept = 0;
  // Queues a copy on `stream`; the host side must be pinned memory from acquire_pinned.
  // An error in the copy itself may surface only at the next wait or synchronize.
  virtual void copy_async(void* dst, const void* src, size_t nbytes, CopyKind kind, void* stream) = 0;
  virtual void record(void* event, void* stream) = 0;
  virtual bool query(void* event) = 0;         // true once everything before the record ran
  virtual void wait(void* event) = 0;          // blocks until then; throws the stream's error
  virtual void synchronize(void* stream) = 0;  // blocks, without spinning, until the stream is idle

  // Pinned host buffers, cached between calls because pinning costs far more than a
  // transfer of the same size; a request of a new size frees cached buffers of other
  // sizes. Thread safe. Virtual so that a backend can account for its buffers.
  virtual void* acquire_pinned(size_t nbytes);
  virtual void release_pinned(void* p, size_t nbytes) noexcept;
  // Frees every cached buffer not in use; returns how many were freed.
  size_t trim_pinned() noexcept;

 protected:
  virtual void* alloc_pinned(size_t nbytes) = 0;
  virtual void free_pinned(void* p) noexcept = 0;

 private:
  std::mutex pinned_mutex_;
  std::multimap<size_t, void*> cached_;  // nbytes -> free buffer
};

// The CUDA device `index` (process-wide, created on first use); throws CudaError when
// the runtime is unavailable.
Device& cuda_device(int index);

// The device `index` of the backend named `backend`: "cuda", or one added with
// register_backend. Throws std::invalid_argument for a name no backend has, and whatever
// the backend throws (CudaError when the CUDA runtime is unavailable).
Device& find_device(const std::string& backend, int index);

// Adds (or replaces) the backend `name`, whose device `index` `factory` returns.
// Process-wide; thread safe.
using DeviceFactory = Device& (*)(int index);
void register_backend(const std::string& name, DeviceFactory factory);

}  // namespace tensorfile
