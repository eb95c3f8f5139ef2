"""Running a schedule: the NumPy `executor`, glibc tuning (`allocator`), pooled upload
`buffers`, real-peak measurement (`measure`) and op timing for profiled plans
(`profiling`)."""
