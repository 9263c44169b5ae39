"""The application: the `sam3-engine` command line and the wiring of stages into a pipeline run."""
