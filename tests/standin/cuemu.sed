# cuemu.sed - turns a kernels/cuda/*.cu file into host C++ for the emulator
# (see cuemu.h): the launch syntax, and dynamic shared memory.
s/\([A-Za-z_][A-Za-z0-9_]*\(<[^<>;]*>\)\{0,1\}\)<<</cuemu::launch("\1", \1, /g
s/>>>(/)(/g
s/extern __shared__ \(__align__([0-9]*) \)\{0,1\}\([A-Za-z_][A-Za-z0-9_ ]*[A-Za-z0-9_]\) \([A-Za-z_][A-Za-z0-9_]*\)\[\];/\2 *\3 = (\2 *)cuemu_here()->dynamic_shared;/
