"""Engine selection: launch serving engines, check which checkpoint formats each one loads,
measure every candidate × engine pair under the recipe's workload, and write the card.

    spec.py       what the user asks (EngineSelectionSpec): engines and their interpreters, goal, sweep,
                  the SLO-rate search (SLORateSpec)
    (quantgate/engine_spec.py, layer 1: EngineSpec, one engine's description from this selection to
                  the gateway's supervisor, and KINDS, each kind's facts and its command-line builder)
    logs.py       pure: the kernel an engine reports, and why a start failed, from its own log
    sweep.py      pure: the concurrency sweep's plan and knee, the failure modes a pair showed
    ratesearch.py pure: the bisection for the highest rate (or concurrency) within the SLOs
    card.py       pure: the engine-selection card (dict + Markdown) and the manifest deployment
    (quantgate/procs.py, layer 1: starts a server on loopback, waits until it answers, watches
                  memory, stops it — the one launcher, shared with the gateway's supervisor)
    artifacts.py  I/O: the candidates' folders, extra GGUFs (bundled, converted from a candidate)
    available.py  I/O: which engines this machine has (`quantgate engines --list`)
    measure.py    I/O: the workload, the sweep and the SLO-rate probes on one started engine, through
                  the load generator
    pairs.py      I/O: one artifact × engine pair — launched, already running, or in-process
    host.py       I/O: the machine's constraints for the card (CPU, memory, GPU)
    matrix.py     I/O: the whole matrix for one recipe, written to <run>/engines/
    cli.py        `quantgate engines` and `quantgate engines --list`
    inproc.py     child process: the in-process transformers engine, measured like the servers

Engines never load into quantgate's process (except the in-process transformers engine, in a
child): each runs in its own interpreter, with the torch it pins.
"""
