// The options of cbam::launch (dialect.cuh) that the launchers' debug ops set (launchers.h
// set_pdl): plain C++, so that every source that sets or reads them sees the one variable.
#pragma once

namespace cbam {

// Programmatic dependent launch: 0 off (the default), 1 on where the device has it (sm_90+).
inline int pdl_mode = 0;

}  // namespace cbam
