"""download-teacher: obtain the teacher and write it as a plain Hugging Face folder."""

from __future__ import annotations

from snn_research.io import atomic_directory
from snn_research.stages.common import StageContext, console
from snn_research.teacher import obtain_teacher, save_teacher_folder


def run(context: StageContext) -> None:
    params = context.params
    console.print(f"download-teacher: loading {params.teacher.source} ({params.teacher.dtype})")
    teacher = obtain_teacher(params.teacher.source, params.teacher.dtype, params.seed)
    with atomic_directory(context.paths.teacher) as tmp:
        summary = save_teacher_folder(teacher, tmp)
        context.manifest(tmp, "download-teacher", {"teacher": params.teacher.model_dump(), "seed": params.seed}, summary)
    context.tracker.log_metrics({"parameters": summary["parameters"], "num_layers": summary["num_layers"]})
    context.tracker.log_artifact(context.paths.teacher / "manifest.json")
    console.print(f"download-teacher: {summary['model_type']} with {summary['parameters']:,} parameters -> {context.paths.teacher}")
