"""Running the pipeline: the inputs every rank reads (inputs, prompts, chat), the process group and
stage-to-stage messages (procgroup, comm), the schedule (generation), and on the last stage
sampling, stops and scoring; process-level setup (runtime)."""
