// The channel gate's `pools` argument (cbam_fused._heads.CHANNEL_POOLS): distinct pool names
// joined by '+' in summation order, or "blend". Shared by the block's composites
// (block_common.h) and the channel-head launchers (launchers/channel_head_common.h).
#pragma once

#include <string>
#include <vector>

namespace cbam {

// The names of a '+'-joined `pools` string, in order (empty names kept: the callers check them).
inline std::vector<std::string> split_pools(const std::string& pools) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    const size_t plus = pools.find('+', start);
    out.push_back(pools.substr(start, plus == std::string::npos ? std::string::npos
                                                                : plus - start));
    if (plus == std::string::npos) return out;
    start = plus + 1;
  }
}

}  // namespace cbam
