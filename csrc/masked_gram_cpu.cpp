// CPU kernels of the fused op: written in issue 2.
#include <torch/library.h>
