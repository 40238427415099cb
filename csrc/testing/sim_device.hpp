// A simulated device for tests: host memory that behaves like a device's (separate
// allocations, copies run later on a stream thread, events, asynchronous faults), added
// to the device table as the backend "sim". Production code never names it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "device.hpp"

namespace tensorfile::testing {

// The simulated device (process-wide).
Device& sim_device();

// Adds the simulation to the device table as "sim" (idempotent).
void register_sim_backend();

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

}  // namespace tensorfile::testing
