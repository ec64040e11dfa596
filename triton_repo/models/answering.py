"""One request's answer on its way from the LLM step to the client: the entry model's half after the request was
prepared and sent (models/entry.py). Each group of LLM-step responses that arrived together becomes one response to
the client; the last one carries what only the end knows (the held-back tail, counts, the whole answer when not
streamed). A streamed request is driven by the request's worker thread up to its first response and then by the
pacer (triton_repo/pacer.py, `pump`); the others by their worker thread to the end (`on_group` per group)."""

from __future__ import annotations

import numpy as np

from ..pb import error, response, scalar
from ..serving_core import AnswerStream, AtMostEvery

# how soon a client that went away is noticed (and its request stopped in the LLM step). Each check is a round trip
# from the stub to tritonserver that cost the entry ~70 µs of CPU at 32 streams on 2 vCPUs (its thread's switches
# included): once per 0.1 s per request, that was 6 µs per streamed token (issue 32, docs/PERFORMANCE.md)
CANCEL_CHECK_S = 0.25


class Answering:
    def __init__(self, entry, request, sender, pb, decoding, inputs, prompt_ids, stream: bool, request_id: str):
        """`entry`: the EntryModel (its link to the LLM step, tokenizer, stream interval and BLS calls); `prompt_ids`:
        the LLM step's input_ids (fake ids at image positions)."""
        self.entry, self.sender, self.pb = entry, sender, pb
        self.decoding, self.inputs, self.ids, self.stream, self.rid = decoding, inputs, prompt_ids, stream, request_id
        self.wanted = set(request.requested_output_names())  # only these go out (pb.response says why)
        self.answer = AnswerStream(entry.tok, decoding)
        # each check is a stub-to-server round trip: once per CANCEL_CHECK_S, not once per streamed response
        self.client_gone = AtMostEvery(request.is_cancelled, CANCEL_CHECK_S)
        self.stopped = self.finished = False
        self.call = None  # the LLM-step request in flight, once the pacer has it (llm_link.Call)

    def send_prompt(self) -> None:
        """`exclude_input_in_output` false, streamed: the prompt's text and ids go first."""
        pb = self.pb
        self.sender.send(response(pb, self.wanted, [
            pb.Tensor("text_output", np.asarray([self.answer.prompt(self.entry.prompt_text_ids(self.ids)).encode()],
                                                object)),
            pb.Tensor("output_ids", self.ids.reshape(-1).astype(np.int32))]))

    def on_group(self, group: list) -> None:
        """LLM-step responses that arrived together → one response to the client (streamed; even when its text is
        held back); with the LLM step's last, the final response, which carries that last run too (a response fewer
        per request)."""
        if not self.stopped and self.client_gone():  # the client went away: stop generating for it
            self.stopped = True
            self.entry.llm.stop_in_background(self.rid)
        live = self.stream and not self.stopped
        piece = self.answer.push([got for resp in group if (got := resp.tokens()) is not None], live)
        ends = bool(group) and group[-1].final
        if piece is not None and live and not ends:  # (_piece_tensors has only what was asked for: no pb.response)
            self.sender.send(self.pb.InferenceResponse(output_tensors=self._piece_tensors(piece, final=False)))
        if ends:
            self.finished = True
            if self.stopped:
                raise ValueError("request cancelled")
            self._finish(piece if live else None)

    def pump(self, now: float) -> float | None:
        """The pacer's turn (pacer.Paced), given when the interval is due or when the LLM step's last response has
        arrived: what has arrived as one run. The next turn an interval later; at the next round when nothing had
        arrived (an engine slower than the interval); None once the final response is sent."""
        try:
            group = self.call.take()
            if not group:
                return now
            self.on_group(group)
            return None if self.finished else now + self.entry.interval
        except Exception as e:  # noqa: BLE001 — every failure becomes this request's error
            self.call.abandon()
            self.sender.send(error(str(e)), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return None

    def _finish(self, piece=None) -> None:
        """The final response; `piece`: the last run, streamed, not sent yet."""
        pb, decoding, answer, wanted = self.pb, self.decoding, self.answer, self.wanted
        counts = []  # return_num_input_tokens / return_num_output_tokens, on the final response
        if scalar(self.inputs, "return_num_input_tokens", False, bool):
            counts.append(pb.Tensor("num_input_tokens", np.asarray([self.ids.size], np.int32)))
        if scalar(self.inputs, "return_num_output_tokens", False, bool):
            counts.append(pb.Tensor("num_output_tokens", np.asarray([len(answer.tokens)], np.int32)))
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if self.stream:
            last = answer.finish_stream()
            if piece is not None:
                last = piece.then(last)
            if last.text or last.ids or counts or decoding.log_probs:
                self.sender.send(response(pb, wanted, self._piece_tensors(last, final=True) + counts), flags=final)
            else:
                self.sender.send(flags=final)
            return
        whole = answer.finish()
        shown = whole.ids if decoding.exclude_input else self.entry.prompt_text_ids(self.ids) + whole.ids
        post = self.entry.call_model(pb, "postprocessing", [pb.Tensor("output_ids", np.asarray(shown, np.int32))],
                                     ["text_output"])
        text_out = pb.get_output_tensor_by_name(post, "text_output").as_numpy()
        returned = whole.ids if decoding.exclude_input else self.ids.reshape(-1).tolist() + whole.ids
        self.sender.send(response(pb, wanted,
            [pb.Tensor("text_output", text_out), pb.Tensor("output_ids", np.asarray(returned, np.int32))]
            + self._log_prob_tensors(whole, final=True) + counts), flags=final)

    def _piece_tensors(self, piece, final: bool) -> list:
        """A streamed piece's tensors, only those the request asked for (`wanted`; empty: all): each costs a
        tensor built, copied to shared memory and serialized again for the client, per response."""
        pb, wants, out = self.pb, self._wants, []
        if wants("text_output"):
            out.append(pb.Tensor("text_output", np.asarray([piece.text.encode()], object)))
        if wants("output_ids"):
            out.append(pb.Tensor("output_ids", np.asarray(piece.ids, np.int32)))
        return out + self._log_prob_tensors(piece, final)

    def _log_prob_tensors(self, piece, final: bool) -> list:
        """output_log_probs [beam=1, tokens] (and cum_log_probs [beam=1] on the final response), if asked."""
        if not self.decoding.log_probs:
            return []
        out = []
        if self._wants("output_log_probs"):
            out.append(self.pb.Tensor("output_log_probs", np.asarray([piece.log_probs], np.float32)))
        if final and self._wants("cum_log_probs"):
            out.append(self.pb.Tensor("cum_log_probs", np.asarray([piece.cum], np.float32)))
        return out

    def _wants(self, name: str) -> bool:
        return not self.wanted or name in self.wanted
