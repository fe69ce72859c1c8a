// Stand-in for the CUDA toolkit header of this name: the CPU execution target (../cuda_host.h).
#pragma once
#include "cuda/emulation/cuda_host.h"
