"""Video through `predict` and `detect_video`: a generated clip in, an MP4 with every frame and
one JSON line per frame out; bad videos are named and skipped, and a killed run leaves no
half-written file under a final name."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from centermask_tf.cli import main
from centermask_tf.data.shapes import make_clip
from centermask_tf.video import VideoError, VideoWriter, read_frames, video_info

FRAMES = 12


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    assert make_clip(str(path), FRAMES, size=(64, 96), fps=8, seed=3) == FRAMES
    return path


def test_a_written_clip_reads_back_frame_by_frame(clip):
    info = video_info(clip)
    assert (info["frames"], info["fps"], info["width"], info["height"], info["codec"]) == (FRAMES, 8.0, 96, 64, "h264")
    frames = list(read_frames(clip))
    assert [i for i, _, _ in frames] == list(range(FRAMES))
    np.testing.assert_allclose([t for _, t, _ in frames], np.arange(FRAMES) / 8.0)
    assert all(f.shape == (64, 96, 3) and f.dtype == np.uint8 for _, _, f in frames)
    # The shapes move: consecutive frames differ.
    assert all(np.abs(a[2].astype(int) - b[2].astype(int)).sum() > 0 for a, b in zip(frames, frames[1:]))


def test_detect_video_gives_each_frame_what_detect_gives_its_pixels(clip, untrained_workdir):
    from centermask_tf import CenterMask

    workdir, _ = untrained_workdir
    detector = CenterMask.from_workdir(str(workdir))
    per_frame = list(detector.detect_video(clip, score_threshold=0.05, batch_size=5))
    assert [r.frame for r in per_frame] == list(range(FRAMES))
    frames = [f for _, _, f in read_frames(clip)]
    # The same batches of 5: a frame at another batch position rounds differently on some CPUs
    # (8e-6 px on a box corner on an AVX2-only host).
    stills = [r for k in range(0, FRAMES, 5) for r in detector.detect(frames[k : k + 5], score_threshold=0.05)]
    for result, still in zip(per_frame, stills, strict=True):
        assert result.path == str(clip) and result.time == pytest.approx(result.frame / 8.0)
        np.testing.assert_array_equal(result.boxes, still.boxes)
        np.testing.assert_array_equal(result.masks, still.masks)
    assert sum(len(r) for r in per_frame) > 0


def test_predict_writes_an_overlay_mp4_and_json_lines_and_skips_bad_videos(clip, untrained_workdir, tmp_path, capsys):
    workdir, _ = untrained_workdir
    folder = tmp_path / "videos"
    folder.mkdir()
    os.link(clip, folder / "clip.mp4")
    (folder / "noise.mp4").write_bytes(os.urandom(5000))
    with VideoWriter(folder / "empty.mp4") as writer:
        writer.write(np.zeros((8, 8, 3), np.uint8))
    os.truncate(folder / "empty.mp4", 0)  # an empty file, named like a video
    out = tmp_path / "out"
    args = ["predict", "--workdir", str(workdir), "--input", str(folder), "--output", str(out), "--score", "0.05"]
    assert main(args) == 0
    assert "an overlay .mp4 and a .jsonl of detections per frame for 1 videos" in capsys.readouterr().out
    predictions = {os.path.basename(p["file"]): p for p in json.loads((out / "predictions.json").read_text())}
    assert "is not a readable video" in predictions["noise.mp4"]["error"]
    assert "is not a readable video" in predictions["empty.mp4"]["error"]
    assert predictions["clip.mp4"]["frames"] == FRAMES
    info = video_info(out / "clip.mp4.overlay.mp4")
    assert (info["frames"], info["fps"], info["width"], info["height"]) == (FRAMES, 8.0, 96, 64)
    lines = [json.loads(line) for line in (out / "clip.mp4.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(FRAMES))
    assert all(set(d) == {"category_id", "category", "bbox", "score", "area", "polygons"}
               for line in lines for d in line["detections"])
    assert sorted(os.listdir(folder)) == ["clip.mp4", "empty.mp4", "noise.mp4"]  # inputs untouched


def test_a_video_without_frames_or_decoder_is_one_line(tmp_path, monkeypatch):
    import av

    from centermask_tf import video

    with pytest.raises(VideoError, match="no frames to write"):
        with VideoWriter(tmp_path / "none.mp4"):
            pass
    assert not os.listdir(tmp_path)  # neither the file nor its temporary
    container = av.open(str(tmp_path / "zero.avi"), mode="w")  # an AVI keeps a stream without frames
    stream = container.add_stream("mpeg4", rate=10)
    stream.width = stream.height = 16
    container.start_encoding()
    container.close()
    with pytest.raises(VideoError, match="holds no frames"):
        list(read_frames(tmp_path / "zero.avi"))

    class NoDecoder:  # what PyAV raises for a codec this FFmpeg build cannot decode
        def __init__(self, container):
            self.streams, self.close = container.streams, container.close

        def decode(self, stream):
            raise av.error.DecoderNotFoundError(-1, "Decoder not found")

    real = video._open
    monkeypatch.setattr(video, "_open", lambda path: NoDecoder(real(path)))
    with VideoWriter(tmp_path / "one.mp4") as writer:
        writer.write(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(VideoError, match="has no decoder for its 'h264' video; re-encode it"):
        list(read_frames(tmp_path / "one.mp4"))


def test_a_killed_video_run_leaves_no_half_written_file_and_the_rerun_finishes(clip, untrained_workdir, tmp_path):
    workdir, _ = untrained_workdir
    out = tmp_path / "out"
    command = [sys.executable, "-m", "centermask_tf.cli", "predict", "--workdir", str(workdir), "--input", str(clip),
               "--output", str(out)]
    # Killed after both files are complete under temporary names, before the JSON lines are renamed.
    killed = subprocess.run(command, env={**os.environ, "CENTERMASK_FAULT": "kill:video"}, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "clip.mp4.jsonl").exists() and not (out / "predictions.json").exists()
    if (out / "clip.mp4.overlay.mp4").exists():  # renamed only once complete
        assert video_info(out / "clip.mp4.overlay.mp4")["frames"] == FRAMES
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert len((out / "clip.mp4.jsonl").read_text().splitlines()) == FRAMES
    assert not [name for name in os.listdir(out) if name.startswith(".tmp-")]
