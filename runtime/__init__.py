"""The pipeline's machinery without Prefect: weight transports, retention and reader leases,
the generator loop and its registry, trainer I/O, evaluations, process supervision (isolated
children, torchrun), the run's writer lease, verify. Imports scalerl/ and storage/ only;
tasks/ wraps it in Prefect tasks (docs/ARCHITECTURE.md)."""
