"""The maths core: errors, options, paths and parameterizations, denoisers, operators, the sampling
framework, tiling, noise estimation, atomic writes and safe model files. Imports nothing above it."""
