// The few CUDA runtime functions tensorfile uses, declared here and bound at run time
// with dlopen, so one build serves machines with and without CUDA.
#pragma once

#include <cstddef>
#include <string>

namespace tensorfile::cuda {

// Values from the CUDA runtime API (driver_types.h); stable across CUDA 11 to 13.
constexpr int kSuccess = 0;
constexpr int kErrorNotReady = 600;
constexpr int kMemcpyHostToDevice = 1;
constexpr int kMemcpyDeviceToHost = 2;
constexpr unsigned kStreamNonBlocking = 1;
constexpr unsigned kEventBlockingSync = 1;  // a waiting thread sleeps instead of spinning
constexpr unsigned kEventDisableTiming = 2;
constexpr unsigned kHostAllocPortable = 1;

using Stream = void*;
using Event = void*;

// Function pointers filled once from libcudart; every entry is non-null once loaded.
struct Api {
  int (*GetDeviceCount)(int*);
  int (*SetDevice)(int);
  int (*GetDevice)(int*);
  int (*HostAlloc)(void**, size_t, unsigned);
  int (*FreeHost)(void*);
  int (*StreamCreateWithFlags)(Stream*, unsigned);
  int (*StreamDestroy)(Stream);
  int (*MemcpyAsync)(void*, const void*, size_t, int, Stream);
  int (*EventCreateWithFlags)(Event*, unsigned);
  int (*EventRecord)(Event, Stream);
  int (*EventQuery)(Event);
  int (*EventSynchronize)(Event);
  int (*EventDestroy)(Event);
  const char* (*GetErrorName)(int);
  const char* (*GetErrorString)(int);
};

// Opens libcudart: `path` when given, else a libcudart already in the process (the one
// torch loaded), else the system's. Once one has loaded, later calls return true; a
// failure is not kept, so a later call (after `import torch` has loaded a runtime, or
// with another path) tries again. Never throws; thread safe.
bool load(const std::string& path = "") noexcept;

// True once load() succeeded and at least one device is visible. Never throws.
bool available() noexcept;

// Why load() or available() said no ("" when they said yes), and the file of the
// library that was opened (its real path, as the loader resolved it).
std::string load_error();
std::string library_path();

// Whether `device`'s primary context is active (the driver's cuDevicePrimaryCtxGetState,
// from libcuda when the process has it loaded): 1 or 0, or -1 when that cannot be told.
// Creates nothing.
int primary_context_active(int device) noexcept;

// The table; throws CudaError("dlopen", ...) when the runtime could not be loaded.
const Api& api();

// Throws CudaError naming `call` and the runtime's name and text for `code` unless it
// is kSuccess.
void check(int code, const char* call);

}  // namespace tensorfile::cuda
