"""The ComfyUI Remote Loader's client stays open while a job uses it, even if the model is released meanwhile."""

from __future__ import annotations

from nodes.remote_model import RemoteModel, RemoteSettings


def test_release_during_a_job_closes_the_client_only_when_the_job_ends():
    model = RemoteModel(RemoteSettings("http://127.0.0.1:9", "", 5.0), api_key=None)
    with model.use() as client:
        model.release()  # e.g. ComfyUI unloading models while the job runs
        assert not client._client.is_closed, "the running job's connection was closed under it"
        assert not model.is_loaded
        with model.use() as second:  # a job started now gets a fresh client
            assert second is not client
    assert client._client.is_closed and second._client.is_closed is False
    model.release()
    assert second._client.is_closed
