"""Beam's DaskRunner, fixed for pipelines with several outputs and several sinks.

Beam 2.77's `apache_beam.runners.dask.dask_runner.DaskRunner` translates each leaf
transform to a dask bag, but

1. keys the bags by *transform*, not by output PCollection, and its ParDo drops the
   output tags: the main and the tagged outputs of a multi-output ParDo
   (`.with_outputs(...)`, e.g. "images" and "rejected") arrive mixed in one bag at
   every consumer;
2. computes only the bag of the *last* visited transform, so any branch that does
   not feed it (a second sink such as `rejected-*.parquet`) never runs.

Every cm-beam stage has tagged outputs and two or more sinks, so on the stock runner
they fail or silently write partial output. `DaskRunner` here keeps Beam's
translation of each transform (Create, ParDo, GroupByKey, Flatten, and the rest as
identities) and changes only the plumbing: ParDo bundles emit `(tag, value)` pairs,
each output PCollection gets the bag filtered to its tag, consumers (main and side
inputs) look bags up by PCollection, and every leaf bag is computed together (dask
shares their common upstream tasks).

`cm_beam.runner.pipeline_options` maps `--runner=DaskRunner` here (ask the lead), or
pass the full path `--runner=cm_beam.runtime.dask_runner.DaskRunner`; connect to a running
cluster with `--dask_client_address=HOST:PORT`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

from apache_beam import TaggedOutput
from apache_beam.pipeline import PipelineVisitor
from apache_beam.runners.common import DoFnInvoker
from apache_beam.runners.dask import dask_runner as beam_dask
from apache_beam.runners.dask import transform_evaluator as te
from apache_beam.runners.dask.overrides import dask_overrides
from apache_beam.utils.windowed_value import WindowedValue


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, WindowedValue) else value


def _apply_dofn_keeping_tags(items, fn, window_fn, invoker_kwargs):
    """One dask partition = one bundle; returns [(tag or None, element), ...].

    The receivers are made here, per bundle: a receiver shared through the task
    graph would mix the outputs of bundles that run in one worker process.
    """
    import apache_beam

    receivers = te.OneReceiver()
    handler = te._OutputHandler(
        window_fn=window_fn,
        main_receivers=receivers[None],
        tagged_receivers=receivers,
        per_element_output_counter=None,
        output_batch_converter=None,
        process_yields_batches=False,
        process_batch_yields_elements=False,
    )
    invoker = DoFnInvoker.create_invoker(
        te.DoFnSignature(fn), handler, bundle_finalizer_param=apache_beam.DoFn.BundleFinalizerParam(), **invoker_kwargs)
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(item)
    invoker.invoke_finish_bundle()  # may emit (buffered writes): collect after it
    invoker.invoke_teardown()
    out = []
    for value in receivers.values:
        if isinstance(value, TaggedOutput):
            out.append((value.tag, _unwrap(value.value)))
        else:
            out.append((None, _unwrap(value)))
    return out


class _TaggedParDo(te.ParDo):
    """Beam's Dask ParDo translation, but the bundle function keeps output tags."""

    def apply(self, input_bag, side_inputs=None):
        import apache_beam

        transform = self.transform
        assert isinstance(transform, apache_beam.ParDo)
        args, kwargs = transform.raw_side_inputs
        main_input = next(iter(self.applied.main_inputs.values()))
        window_fn = main_input.windowing.windowfn if hasattr(main_input, "windowing") else None
        invoker_kwargs = dict(
            context=te.DoFnContext(transform.label, state=None),
            side_inputs=side_inputs,
            input_args=list(args),
            input_kwargs=kwargs,
            user_state_context=None,
        )
        return input_bag.map(te.get_windowed_value, window_fn).map_partitions(
            _apply_dofn_keeping_tags, transform.fn, window_fn, invoker_kwargs
        )


def _elements_of(pairs, tag):
    return [value for t, value in pairs if t == tag]


def _nothing(partition):
    """A leaf's partition is computed for its effects; nothing travels back to the client."""
    return []


@dataclasses.dataclass
class _Visitor(PipelineVisitor):
    bag_kwargs: Dict[str, Any]
    client: Any = None
    bags: Dict[Any, Any] = dataclasses.field(default_factory=dict)  # PCollection -> bag
    consumed: set = dataclasses.field(default_factory=set)
    persisted: set = dataclasses.field(default_factory=set)

    def visit_transform(self, node) -> None:
        op_class = te.TRANSLATIONS.get(node.transform.__class__, te.NoOp)
        if op_class is te.ParDo:
            op_class = _TaggedParDo
        op = op_class(node, bag_kwargs=self.bag_kwargs)
        kwargs: Dict[str, Any] = {"input_bag": None, "side_inputs": None}
        inputs = [pc for pc in node.inputs if pc in self.bags]
        self.consumed.update(inputs)
        if node.inputs and not any(type(pc).__name__ == "PBegin" for pc in node.inputs):
            bags = [self.bags[pc] for pc in inputs]
            kwargs["input_bag"] = bags if isinstance(op, te.Flatten) or len(bags) != 1 else bags[0]
        if node.side_inputs:
            side = []
            for si in node.side_inputs:
                self.consumed.add(si.pvalue)
                if self.client is not None and si.pvalue not in self.persisted:
                    # Materialise a side input once, in the cluster: a task that reads
                    # it would otherwise recompute (and re-run the side effects of) its
                    # whole upstream, e.g. write the shards of a sink a second time.
                    self.bags[si.pvalue] = self.client.persist(self.bags[si.pvalue])
                    self.persisted.add(si.pvalue)
                side.append(te.SideInputMap(type(si), si._view_options(),
                                            te.DaskBagWindowedIterator(self.bags[si.pvalue], si._window_mapping_fn)))
            kwargs["side_inputs"] = side
        result = op.apply(**kwargs)
        if isinstance(op, _TaggedParDo):
            extra = set(getattr(node.transform, "output_tags", ()) or ())
            for tag, pcoll in node.outputs.items():
                want = tag if tag in extra else None
                self.bags[pcoll] = result.map_partitions(_elements_of, want)
        else:
            for pcoll in node.outputs.values():
                self.bags[pcoll] = result

    def leaves(self) -> List[Any]:
        return [bag for pcoll, bag in self.bags.items() if pcoll not in self.consumed]


class _Result(beam_dask.DaskRunnerResult):
    """Beam's result, plus: the client is closed once the job is over (it would
    otherwise keep reconnecting to a scheduler that may be gone)."""

    def wait_until_finish(self, duration=None) -> str:
        try:
            return super().wait_until_finish(duration)
        finally:
            if self._state in ("DONE", "FAILED", "CANCELLED"):
                self._cm_beam_keep_alive = None
                self.client.close()


class DaskRunner(beam_dask.DaskRunner):
    """Runs a Beam pipeline on a dask.distributed cluster (all outputs, all sinks)."""

    def run_pipeline(self, pipeline, options):
        import dask
        import dask.distributed as ddist

        dask_options = options.view_as(beam_dask.DaskOptions).get_all_options(drop_default=True, current_only=True)
        bag_kwargs = beam_dask.DaskOptions._extract_bag_kwargs(dask_options)
        client = ddist.Client(**dask_options)
        pipeline.replace_all(dask_overrides())
        visitor = _Visitor(bag_kwargs, client)
        pipeline.visit(visitor)
        # The result waits on every leaf, and Beam's result gathers what it waits on:
        # reduce each leaf to empty partitions so no PCollection is shipped to the client.
        leaves = [bag.map_partitions(_nothing) for bag in visitor.leaves()]
        futures = client.compute(list(dask.optimize(*leaves))) if leaves else []
        result = _Result(client, futures)
        # The persisted side inputs are futures that tasks read by key: keep them
        # referenced until the job is over, or the scheduler releases them.
        result._cm_beam_keep_alive = visitor.bags
        return result
