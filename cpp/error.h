// error.h - the one exception type orcd's C++ code throws.
//
// Messages name the file, the field or tensor, and the value that is wrong;
// the Python bindings turn orcd::Error into ValueError (bad input) or
// RuntimeError (engine failures) with the message unchanged.
#pragma once
#include <stdexcept>
#include <string>

namespace orcd {

// Bad user input: a malformed file, an unsupported model, an invalid argument.
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

}  // namespace orcd
