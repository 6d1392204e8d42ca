"""The published ECInstruct results that evaluate.py's results.md and results.png compare a run with.

Pure data, no imports. Primary metric per task (AVE F1*, PRP/SA macro-F1, PM/PSI/AP F1, SR HR@1,
MPC accuracy, QPR NDCG, AG F_BERT) on the test sets of IND_Diverse_Instruction (IND) and
OOD_Diverse_Instruction (OOD).

Sources:
- eCeLLM (Peng et al., ICML 2024), project page tables/overall_performance_{indomain,OOD}.html:
  the general-purpose LLMs are evaluated 1-shot, eCeLLM (LoRA-tuned on IND_Diverse train) 0-shot.
- The small-model study (Oswal, Kulkarni, Bhalerao, Kawatkar, Kachare; draft of January 2025),
  Tables 2 and 3: SmolLM2 and Llama-3.2 LoRA-tuned on IND_Diverse train, sampled at temperature 0.15.
"""

IND_TASKS = ("AVE", "PRP", "PM", "SA", "SR", "MPC", "PSI", "QPR", "AP", "AG")
OOD_TASKS = ("AVE", "PRP", "SA", "SR", "AP", "AG")
NA = None  # published as "–" (not evaluated)
PAPER_IND = [  # (model, source, scores in IND_TASKS order)
    ("GPT-4 Turbo", "eCeLLM, 1-shot", (0.495, 0.326, 0.753, 0.516, 0.387, 0.611, 0.195, 0.875, 0.649, 0.858)),
    ("Gemini Pro", "eCeLLM, 1-shot", (0.396, 0.136, 0.867, 0.470, 0.269, 0.584, 0.248, 0.821, 0.506, 0.855)),
    ("Claude 2.1", "eCeLLM, 1-shot", (0.381, 0.275, 0.523, 0.415, 0.066, 0.655, 0.273, 0.821, 0.280, 0.841)),
    ("Llama-2 13B-chat", "eCeLLM, 1-shot", (0.002, 0.333, 0.434, 0.188, 0.056, 0.504, 0.252, 0.815, 0.623, 0.811)),
    ("Mistral-7B-Instruct-v0.2", "eCeLLM, 1-shot", (0.369, 0.324, 0.613, 0.470, 0.164, 0.529, 0.305, 0.842, 0.588, 0.853)),
    ("eCeLLM-L (Llama-2 13B-chat)", "eCeLLM", (0.582, 0.611, 0.995, 0.648, 0.526, 0.684, 0.501, 0.870, 0.851, 0.841)),
    ("eCeLLM-M (Mistral-7B-Instruct-v0.2)", "eCeLLM", (0.662, 0.558, 0.995, 0.639, 0.542, 0.696, 0.305, 0.876, 0.846, 0.842)),
    ("eCeLLM-S (Phi-2)", "eCeLLM", (0.509, 0.518, 0.991, 0.596, 0.479, 0.650, 0.392, 0.870, 0.846, 0.842)),
    ("SmolLM2-360M-EC", "study, Table 2", (0.858, 0.302, 0.720, 0.516, 0.046, 0.633, NA, 0.809, 0.794, 0.852)),
    ("SmolLM2-1.7B-EC", "study, Table 2", (0.988, 0.596, 0.995, 0.604, 0.481, 0.666, 0.373, 0.869, 0.860, 0.837)),
    ("Llama3.2-1B-EC", "study, Table 2", (NA, 0.564, 0.991, 0.596, 0.495, 0.419, 0.371, 0.874, 0.851, 0.856)),
]
PAPER_OOD = [
    ("GPT-4 Turbo", "eCeLLM, 1-shot", (0.397, 0.392, 0.510, 0.198, 0.680, 0.860)),
    ("Gemini Pro", "eCeLLM, 1-shot", (0.275, 0.123, 0.454, 0.116, 0.552, 0.856)),
    ("Claude 2.1", "eCeLLM, 1-shot", (0.410, 0.277, 0.369, 0.036, 0.245, 0.842)),
    ("Llama-2 13B-chat", "eCeLLM, 1-shot", (0.000, 0.324, 0.178, 0.050, 0.644, 0.808)),
    ("Mistral-7B-Instruct-v0.2", "eCeLLM, 1-shot", (0.264, 0.327, 0.438, 0.108, 0.608, 0.851)),
    ("eCeLLM-L (Llama-2 13B-chat)", "eCeLLM", (0.335, 0.558, 0.629, 0.273, 0.867, 0.841)),
    ("eCeLLM-M (Mistral-7B-Instruct-v0.2)", "eCeLLM", (0.367, 0.502, 0.640, 0.280, 0.878, 0.840)),
    ("eCeLLM-S (Phi-2)", "eCeLLM", (0.302, 0.520, 0.565, 0.241, 0.879, 0.840)),
    ("SmolLM2-360M-EC", "study, Table 3", (0.659, 0.200, 0.503, 0.044, 0.832, 0.856)),
    ("SmolLM2-1.7B-EC", "study, Table 3", (0.573, 0.542, 0.568, 0.249, 0.885, 0.838)),
]
# Footnotes on published cells: (model prefix, task) -> note.
PAPER_NOTES = {
    ("SmolLM2", "AVE"): "The study's AVE numbers are not valid: its scorer omits the count of predicted triples "
                        "(precision = hits / 1e-6), so its F1 is about 2 x recall. Not comparable with F1*.",
    ("SmolLM2-360M-EC", "PSI"): "Published as '–'; recomputed from the study's predictions it is F1 0.000 "
                                "(the model answers 'no' to every item).",
    ("Llama3.2-1B-EC", "MPC"): "Macro-F1, not accuracy; the model's MPC accuracy is 0.680.",
}
PAPER_BERTSCORE = ("roberta-large", 17)   # bert-score's default for lang="en", as eCeLLM calls it
