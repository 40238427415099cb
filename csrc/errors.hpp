// The engine's error hierarchy; bindings.cpp maps each type to one Python exception.
#pragma once

#include <stdexcept>
#include <string>

namespace tensorfile {

// Bytes that break the format's rules: the caller's file is malformed or damaged.
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A failed system call, carrying errno and the path it concerned.
class IoError : public std::runtime_error {
 public:
  IoError(int error_number, std::string path, const std::string& what)
      : std::runtime_error(what), errno_(error_number), path_(std::move(path)) {}
  int error_number() const noexcept { return errno_; }
  const std::string& path() const noexcept { return path_; }

 private:
  int errno_;
  std::string path_;
};

// A failed CUDA runtime or cuFile call, carrying the call and the library's name for the
// error code (e.g. "cudaErrorIllegalAddress"), so a message can be looked up.
class CudaError : public std::runtime_error {
 public:
  CudaError(std::string call, std::string name, const std::string& what)
      : std::runtime_error(what), call_(std::move(call)), name_(std::move(name)) {}
  const std::string& call() const noexcept { return call_; }
  const std::string& name() const noexcept { return name_; }

 private:
  std::string call_;
  std::string name_;
};

}  // namespace tensorfile
