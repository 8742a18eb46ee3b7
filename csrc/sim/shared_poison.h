// Poisoning of the static `__shared__` variables of a kernel between blocks (simulator only).
//
// Under the simulator `__shared__` is `static`, so a kernel's shared arrays keep the previous
// block's values; a kernel that reads shared memory it did not write in this block would pass by
// luck. Before every block the simulator fills the launched kernel's static shared variables with
// 0xff bytes (NaN for floating types). It finds them in the extension's ELF symbol table: the
// static locals of the kernel function itself (mangled `_ZZ<kernel>E<name>`). `__shared__`
// variables declared in helper (CBAM_DEVICE) functions are not found and not poisoned.
#pragma once

namespace cbam {
namespace sim {

// Looks up (once per kernel) the static shared variables of `kernel` for poison_static_shared().
void select_static_shared(const void* kernel);
// Fills the selected kernel's static shared variables with 0xff bytes.
void poison_static_shared();
// Whether [p, p + bytes) overlaps one of the selected kernel's static shared variables.
bool in_static_shared(const void* p, unsigned long bytes);
// The static shared variables of the most recently launched kernel, as (bytes, count).
void selected_static_shared_info(unsigned long* bytes, unsigned long* count);
// The static shared variables found for `kernel`, as (bytes, count); for tests.
void static_shared_info(const void* kernel, unsigned long* bytes, unsigned long* count);

}  // namespace sim
}  // namespace cbam
