using System.Text.Json.Serialization;

namespace Optpoline.Cli.Inspect;

/// <summary>What <c>optpoline inspect</c> found in one target.</summary>
internal sealed record InspectReport(string Source, IReadOnlyList<EngineReport> Engines);

/// <summary>One engine: its object address, promotion mode, and sites.</summary>
internal sealed record EngineReport(string Address, string Promotion, bool PatchingSuspended, IReadOnlyList<SiteReport> Sites);

/// <summary>One site as it stands in the target.</summary>
internal sealed record SiteReport(string Name, string Kind, string Register, string State, IReadOnlyList<TargetReport> Targets, long Samples, long Patches, IReadOnlyList<TargetReport> Unreachable, IReadOnlyList<CodeReport> Code);

/// <summary>A target (promoted, or refused as out of direct reach), and its name in the target process (null when nothing names it).</summary>
internal sealed record TargetReport(string Address, string? Name);

/// <summary>A piece of a site's code, disassembled from the target's memory.</summary>
internal sealed record CodeReport(string What, string Address, int Length, IReadOnlyList<string> Disassembly);

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, WriteIndented = true)]
[JsonSerializable(typeof(InspectReport))]
internal sealed partial class InspectJsonContext : JsonSerializerContext
{
}
