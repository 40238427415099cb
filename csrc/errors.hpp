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

}  // namespace tensorfile
