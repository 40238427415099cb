// dlopen-based binding of the CUDA runtime (see cuda.hpp).
#include "shim/cuda.hpp"

#include <dlfcn.h>

#include <atomic>
#include <fstream>
#include <mutex>

#include "errors.hpp"

namespace tensorfile::cuda {

namespace {

// Newest first: a process holds at most one of these, and torch's wins.
const char* const kSonames[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"};

struct State {
  std::mutex mutex;
  std::atomic<bool> loaded{false};
  int device_count = 0;
  Api api{};
  std::string error;
  std::string path;
  int (*device_get)(int*, int) = nullptr;                  // cuDeviceGet
  int (*primary_state)(int, unsigned*, int*) = nullptr;  // cuDevicePrimaryCtxGetState
};

State& state() {
  static State* s = new State();  // leaked: worker threads may use it at exit
  return *s;
}

// A libcudart mapped into this process already (e.g. torch's, under site-packages).
std::string mapped_cudart() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    auto slash = line.find('/');
    if (slash == std::string::npos) continue;
    std::string file = line.substr(slash);
    auto base = file.rfind('/');
    if (file.compare(base + 1, 12, "libcudart.so") == 0) return file;
  }
  return "";
}

void* open_library(const std::string& path, std::string& used, std::string& error) {
  if (!path.empty()) {
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) error = dlerror();
    used = path;
    return h;
  }
  for (const char* name : kSonames) {
    if (void* h = dlopen(name, RTLD_NOW | RTLD_NOLOAD)) {
      used = name;
      return h;
    }
  }
  std::string mapped = mapped_cudart();
  if (!mapped.empty()) {
    if (void* h = dlopen(mapped.c_str(), RTLD_NOW | RTLD_LOCAL)) {
      used = mapped;
      return h;
    }
  }
  for (const char* name : kSonames) {
    if (void* h = dlopen(name, RTLD_NOW | RTLD_LOCAL)) {
      used = name;
      return h;
    }
  }
  error = "no libcudart found (tried libcudart.so.13, .12, .11.0 and the libraries already loaded)";
  return nullptr;
}

template <typename F>
bool bind(void* h, const char* name, F& slot, std::string& error) {
  slot = reinterpret_cast<F>(dlsym(h, name));
  if (!slot) error = std::string("libcudart lacks ") + name;
  return slot != nullptr;
}

void do_load(State& s, const std::string& path) {
  void* h = open_library(path, s.path, s.error);
  if (!h) return;
  Api& a = s.api;
  bool ok = bind(h, "cudaGetDeviceCount", a.GetDeviceCount, s.error) &&
            bind(h, "cudaSetDevice", a.SetDevice, s.error) && bind(h, "cudaGetDevice", a.GetDevice, s.error) &&
            bind(h, "cudaHostAlloc", a.HostAlloc, s.error) && bind(h, "cudaFreeHost", a.FreeHost, s.error) &&
            bind(h, "cudaStreamCreateWithFlags", a.StreamCreateWithFlags, s.error) &&
            bind(h, "cudaStreamDestroy", a.StreamDestroy, s.error) &&
            bind(h, "cudaMemcpyAsync", a.MemcpyAsync, s.error) &&
            bind(h, "cudaEventCreateWithFlags", a.EventCreateWithFlags, s.error) &&
            bind(h, "cudaEventRecord", a.EventRecord, s.error) && bind(h, "cudaEventQuery", a.EventQuery, s.error) &&
            bind(h, "cudaEventSynchronize", a.EventSynchronize, s.error) &&
            bind(h, "cudaEventDestroy", a.EventDestroy, s.error) &&
            bind(h, "cudaGetErrorName", a.GetErrorName, s.error) &&
            bind(h, "cudaGetErrorString", a.GetErrorString, s.error);
  if (!ok) return;  // the handle stays open: harmless, and dlclose of a runtime is not
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(a.GetDeviceCount), &info) && info.dli_fname && *info.dli_fname) {
    s.path = info.dli_fname;
  }
  s.error.clear();
  // The driver's primary-context query, optional: the stand-in runtime in the tests
  // defines it, a real process finds it in the libcuda that libcudart loaded.
  void* drv = nullptr;
  if (dlsym(h, "cuDevicePrimaryCtxGetState")) {
    drv = h;
  } else {
    a.GetDeviceCount(&s.device_count);  // makes libcudart load libcuda, where there is one
    drv = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
  }
  if (drv) {
    s.device_get = reinterpret_cast<int (*)(int*, int)>(dlsym(drv, "cuDeviceGet"));
    s.primary_state = reinterpret_cast<int (*)(int, unsigned*, int*)>(dlsym(drv, "cuDevicePrimaryCtxGetState"));
  }
  s.loaded = true;
  int count = 0;
  int code = a.GetDeviceCount(&count);
  if (code != kSuccess) {
    s.error = std::string("cudaGetDeviceCount failed: ") + a.GetErrorName(code) + " (" + a.GetErrorString(code) + ")";
    count = 0;
  } else if (count == 0) {
    s.error = "no CUDA device is visible";
  }
  s.device_count = count;
}

}  // namespace

bool load(const std::string& path) noexcept {
  State& s = state();
  if (s.loaded.load()) return true;
  try {
    std::lock_guard<std::mutex> lock(s.mutex);
    if (!s.loaded.load()) {
      s.api = Api{};
      s.path.clear();
      do_load(s, path);
    }
  } catch (...) {
    return false;
  }
  return s.loaded.load();
}

int primary_context_active(int device) noexcept {
  State& s = state();
  if (!load() || !s.device_get || !s.primary_state) return -1;
  int dev = 0;
  unsigned flags = 0;
  int active = 0;
  if (s.device_get(&dev, device) != 0 || s.primary_state(dev, &flags, &active) != 0) return -1;
  return active ? 1 : 0;
}

bool available() noexcept { return load() && state().device_count > 0; }

std::string load_error() {
  State& s = state();
  if (load()) return s.error;  // fixed once loaded
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.error;
}

std::string library_path() { return load() ? state().path : ""; }

const Api& api() {
  if (!load()) throw CudaError("dlopen", "cudaErrorLibraryNotFound", "CUDA runtime unavailable: " + load_error());
  return state().api;
}

void check(int code, const char* call) {
  if (code == kSuccess) return;
  const Api& a = api();
  std::string name = a.GetErrorName(code);
  throw CudaError(call, name, std::string(call) + " failed: " + name + " (" + a.GetErrorString(code) + ")");
}

}  // namespace tensorfile::cuda
