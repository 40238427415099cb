// dlopen-based binding of the CUDA runtime (see cuda.hpp).
#include "shim/cuda.hpp"

#include <dlfcn.h>

#include <fstream>
#include <mutex>

#include "errors.hpp"

namespace tensorfile::cuda {

namespace {

// Newest first: a process holds at most one of these, and torch's wins.
const char* const kSonames[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"};

struct State {
  std::once_flag once;
  bool loaded = false;
  int device_count = 0;
  Api api{};
  std::string error;
  std::string path;
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
            bind(h, "cudaStreamSynchronize", a.StreamSynchronize, s.error) &&
            bind(h, "cudaMemcpyAsync", a.MemcpyAsync, s.error) &&
            bind(h, "cudaEventCreateWithFlags", a.EventCreateWithFlags, s.error) &&
            bind(h, "cudaEventRecord", a.EventRecord, s.error) && bind(h, "cudaEventQuery", a.EventQuery, s.error) &&
            bind(h, "cudaEventSynchronize", a.EventSynchronize, s.error) &&
            bind(h, "cudaEventDestroy", a.EventDestroy, s.error) &&
            bind(h, "cudaGetErrorName", a.GetErrorName, s.error) &&
            bind(h, "cudaGetErrorString", a.GetErrorString, s.error);
  if (!ok) return;  // the handle stays open: harmless, and dlclose of a runtime is not
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
  try {
    std::call_once(s.once, [&] { do_load(s, path); });
  } catch (...) {
    return false;
  }
  return s.loaded;
}

bool available() noexcept { return load() && state().device_count > 0; }

std::string load_error() {
  load();
  return state().error;
}

std::string library_path() {
  load();
  return state().loaded ? state().path : "";
}

const Api& api() {
  if (!load()) throw CudaError("dlopen", "cudaErrorLibraryNotFound", "CUDA runtime unavailable: " + state().error);
  return state().api;
}

void check(int code, const char* call) {
  if (code == kSuccess) return;
  const Api& a = api();
  std::string name = a.GetErrorName(code);
  throw CudaError(call, name, std::string(call) + " failed: " + name + " (" + a.GetErrorString(code) + ")");
}

}  // namespace tensorfile::cuda
