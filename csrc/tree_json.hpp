// The object tree of a header (docs/format.md) as compact JSON, from the Python objects the
// flattener builds: byte for byte what json.dumps(separators=(",", ":"), ensure_ascii=True,
// allow_nan=False) writes for them.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

namespace tensorfile {

// Encodes lists, dicts with str keys, str, int, bool, None and finite floats. Throws
// pybind11::type_error for any other object and pybind11::value_error for a non-finite
// float, as json.dumps raises TypeError and ValueError, and std::length_error past `max_depth`
// nested containers.
std::string encode_tree_json(pybind11::handle obj, int max_depth);

}  // namespace tensorfile
