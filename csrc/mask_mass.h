// The order in which every implementation of cast::_inverse_mask_mass (schema in module.cpp)
// sums a mask's mass n_k = sum_n m_k[n]^2 in float64, so that the CPU and the GPU give the
// same bits and neither depends on its thread count: deterministic, no atomics.
//
// A mask's positions are cut into chunks of kMassChunk. In a chunk, lane t of kMassLanes adds
// the squares at t, t + kMassLanes, t + 2 kMassLanes, ... in that order, starting from 0; then
// the lanes are added pairwise, lane t + h into lane t for h = kMassLanes / 2, ..., 2, 1. The
// chunks' sums of a mask are added the same way: lane t adds chunks t, t + kMassLanes, ..., then
// pairwise. Squares of 16- and 32-bit values are exact in float64 (no rounding until the sums).
// Then 1 / n_k in float64 (0 where n_k == 0), rounded to nearest in the accumulation dtype:
// what cast.reference.inverse gives for the same n_k.
#pragma once

#include <cstdint>

inline constexpr int kMassLanes = 256;
inline constexpr int kMassPerLane = 32;
inline constexpr int64_t kMassChunk = int64_t{kMassLanes} * kMassPerLane;

// The float64 partial sums a call keeps: one per chunk and mask.
inline int64_t cast_mass_chunks(int64_t positions) {
  return (positions + kMassChunk - 1) / kMassChunk;
}
