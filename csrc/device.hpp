// A small device interface (pinned host buffers, streams, events, async copies) with two
// implementations: CUDA through the runtime shim, and a host-memory simulation that
// behaves like a device (separate allocations, copies on another thread) for tests.
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
  // Makes `previous` current again, so a caller's thread (Python's, torch's current
  // device) is left as it was.
  virtual void restore(int previous) noexcept = 0;
  virtual void* create_stream() = 0;
  virtual void destroy_stream(void* stream) noexcept = 0;
  virtual void* create_event() = 0;
  virtual void destroy_event(void* event) noexcept = 0;
  // Queues a copy on `stream`; the host side must be pinned memory from acquire_pinned.
  // An error in the copy itself may surface only at the next wait or synchronize.
  virtual void copy_async(void* dst, const void* src, size_t nbytes, CopyKind kind, void* stream) = 0;
  virtual void record(void* event, void* stream) = 0;
  virtual bool query(void* event) = 0;         // true once everything before the record ran
  virtual void wait(void* event) = 0;          // blocks until then; throws the stream's error
  virtual void synchronize(void* stream) = 0;  // blocks until the stream is idle

  // Pinned host buffers, cached between calls because pinning costs far more than a
  // transfer of the same size; a request of a new size frees cached buffers of other
  // sizes. Thread safe.
  void* acquire_pinned(size_t nbytes);
  void release_pinned(void* p, size_t nbytes) noexcept;
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

// The simulated device (process-wide).
Device& sim_device();

// Test hooks for the simulation.
struct SimCounters {
  int64_t pinned_live = 0;    // pinned buffers allocated and not freed (cached included)
  int64_t pinned_in_use = 0;  // pinned buffers handed out and not released
  int64_t pinned_peak = 0;    // most pinned buffers in use at once since the last reset
  int64_t streams_live = 0;
  int64_t events_live = 0;
  int64_t threads_live = 0;  // one per live stream
  int64_t device_allocs_live = 0;
  int64_t copies = 0;  // copies executed since the last reset
};
SimCounters sim_counters();
void sim_reset_peak();
// The countdown-th following copy (1 = the next) fails asynchronously, as a CUDA copy
// fault would; 0 disarms. `delay_us` slows every copy down, to exercise back-pressure.
void sim_configure(uint64_t copy_fault_countdown, uint64_t delay_us);
// Simulated device memory: zero-filled, owned by the simulation.
uintptr_t sim_alloc(size_t nbytes);
void sim_free(uintptr_t ptr);
// Direct access for tests; [ptr, ptr + nbytes) must lie inside one allocation.
void sim_read(uintptr_t ptr, void* dst, size_t nbytes);
void sim_write(uintptr_t ptr, const void* src, size_t nbytes);

}  // namespace tensorfile
