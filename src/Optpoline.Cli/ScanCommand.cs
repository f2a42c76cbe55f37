using System.Collections.Immutable;
using System.Reflection.Metadata;
using System.Reflection.PortableExecutable;
using System.Text;
using System.Text.Json;
using Optpoline.Configuration;

namespace Optpoline.Cli;

/// <summary>
/// <c>optpoline scan ASSEMBLY... [--merge CONFIG]</c>: finds members marked <see cref="PromoteCallsAttribute"/>
/// or <see cref="NeverPromoteAttribute"/> in assemblies' metadata (System.Reflection.Metadata: nothing is
/// loaded or run) and prints the matching <c>sites.include</c> / <c>sites.exclude</c> patterns, or adds
/// them to a config file, keeping everything else in it (comments included) as it was.
/// </summary>
internal static class ScanCommand
{
    private const string Namespace = "Optpoline";

    public static int Run(string[] args, TextWriter output, TextWriter error)
    {
        var at = Array.IndexOf(args, "--merge");
        if (at >= 0 && at + 1 >= args.Length)
        {
            return Program.Fail(error, "scan --merge needs a config file.");
        }

        var merge = at >= 0 ? args[at + 1] : null;
        var assemblies = args.Where((_, i) => at < 0 || (i != at && i != at + 1)).ToList();
        if (assemblies.Count == 0)
        {
            return Program.Fail(error, "scan needs at least one assembly.");
        }

        var include = new List<string>();
        var exclude = new List<string>();
        var failed = false;
        foreach (var path in assemblies)
        {
            try
            {
                var found = Scan(path);
                output.WriteLine($"{path}: {found.Count(f => f.Include)} to include, {found.Count(f => !f.Include)} to exclude");
                foreach (var (member, pattern, promote) in found)
                {
                    output.WriteLine($"  {(promote ? "include" : "exclude")} \"{pattern}\"  ({member})");
                    (promote ? include : exclude).Add(pattern);
                }
            }
            catch (Exception e) when (e is BadImageFormatException or IOException or UnauthorizedAccessException or InvalidOperationException)
            {
                error.WriteLine($"optpoline: {path}: {Describe(e)}");
                failed = true;
            }
        }

        include = [.. include.Distinct(StringComparer.Ordinal)];
        exclude = [.. exclude.Distinct(StringComparer.Ordinal)];
        if (merge is null)
        {
            output.WriteLine(JsonSerializer.Serialize(new SitesSnippet(new SitesPatterns(include, exclude)), SnippetJsonContext.Default.SitesSnippet));
        }
        else if (!failed)
        {
            try
            {
                var (added, text) = Merge(File.ReadAllText(merge), merge, include, exclude);
                File.WriteAllText(merge, text);
                output.WriteLine($"{merge}: {added} patterns added");
            }
            catch (Exception e) when (e is ConfigException or IOException or UnauthorizedAccessException)
            {
                error.WriteLine($"optpoline: {e.Message}");
                return ExitCodes.BadInput;
            }
        }

        return failed ? ExitCodes.BadInput : ExitCodes.Ok;
    }

    /// <summary>The marked members of one assembly: (member, pattern, true for include).</summary>
    /// <exception cref="BadImageFormatException">Not a PE file, or no .NET metadata, or damaged.</exception>
    internal static List<(string Member, string Pattern, bool Include)> Scan(string path)
    {
        using var stream = File.OpenRead(path);
        using var pe = new PEReader(stream);
        if (!pe.HasMetadata)
        {
            throw new BadImageFormatException("not a .NET assembly (no metadata).");
        }

        var reader = pe.GetMetadataReader();
        var found = new List<(string, string, bool)>();
        foreach (var typeHandle in reader.TypeDefinitions)
        {
            var type = reader.GetTypeDefinition(typeHandle);
            var typeName = FullName(reader, type);
            foreach (var handle in type.GetMethods())
            {
                var method = reader.GetMethodDefinition(handle);
                Collect(reader, method.GetCustomAttributes(), typeName, reader.GetString(method.Name), found);
            }

            foreach (var handle in type.GetFields())
            {
                var field = reader.GetFieldDefinition(handle);
                Collect(reader, field.GetCustomAttributes(), typeName, reader.GetString(field.Name), found);
            }

            foreach (var handle in type.GetProperties())
            {
                var property = reader.GetPropertyDefinition(handle);
                Collect(reader, property.GetCustomAttributes(), typeName, reader.GetString(property.Name), found);
            }
        }

        return found;
    }

    /// <summary>
    /// Adds the patterns to <c>sites.include</c> / <c>sites.exclude</c> of a config file's text: only the
    /// two arrays are rewritten (or the keys inserted), the rest of the text stays byte for byte. The
    /// result must still be a valid config.
    /// </summary>
    /// <exception cref="ConfigException">The file is not a valid config, before or after.</exception>
    internal static (int Added, string Text) Merge(string text, string path, IReadOnlyList<string> include, IReadOnlyList<string> exclude)
    {
        var config = ConfigFile.Parse(text, path);
        var wantedInclude = config.Sites.Include.Concat(include).Distinct(StringComparer.Ordinal).ToArray();
        var wantedExclude = config.Sites.Exclude.Concat(exclude).Distinct(StringComparer.Ordinal).ToArray();
        var added = wantedInclude.Length - config.Sites.Include.Length + wantedExclude.Length - config.Sites.Exclude.Length;
        if (added == 0)
        {
            return (0, text);
        }

        // Where things are: the root object, the sites object, and each array's value (character offsets).
        var bytes = Encoding.UTF8.GetBytes(text);
        var json = new Utf8JsonReader(bytes, new JsonReaderOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true });
        int root = -1, sites = -1;
        (int Start, int End)? includeSpan = null, excludeSpan = null;
        string? property = null, section = null;
        while (json.Read())
        {
            switch (json.TokenType)
            {
                case JsonTokenType.PropertyName:
                    property = json.GetString();
                    break;
                case JsonTokenType.StartObject when json.CurrentDepth == 0:
                    root = (int)json.TokenStartIndex;
                    break;
                case JsonTokenType.StartObject when json.CurrentDepth == 1:
                    section = property;
                    if (section == "sites")
                    {
                        sites = (int)json.TokenStartIndex;
                    }

                    break;
                case JsonTokenType.StartArray when json.CurrentDepth == 2 && section == "sites" && property is "include" or "exclude":
                    var start = (int)json.TokenStartIndex;
                    var which = property;
                    json.Skip();
                    var span = (Chars(bytes, start), Chars(bytes, (int)json.TokenStartIndex + 1));
                    if (which == "include")
                    {
                        includeSpan = span;
                    }
                    else
                    {
                        excludeSpan = span;
                    }

                    break;
            }
        }

        // Edits from the end backwards, so earlier offsets stay valid.
        var edits = new List<(int At, int Length, string Text)>();
        var missing = new List<string>();
        AddEdit(edits, missing, "include", includeSpan, wantedInclude, config.Sites.Include.Length != wantedInclude.Length);
        AddEdit(edits, missing, "exclude", excludeSpan, wantedExclude, config.Sites.Exclude.Length != wantedExclude.Length);
        if (missing.Count > 0)
        {
            var inner = string.Join(", ", missing);
            edits.Add(sites >= 0
                ? (Chars(bytes, sites) + 1, 0, $" {inner},")
                : (Chars(bytes, root) + 1, 0, $"\n  \"sites\": {{ {inner} }},"));
        }

        var result = new StringBuilder(text);
        foreach (var (at, length, replacement) in edits.OrderByDescending(e => e.At))
        {
            result.Remove(at, length).Insert(at, replacement);
        }

        var merged = result.ToString();
        ConfigFile.Parse(merged, path);
        return (added, merged);
    }

    private static void AddEdit(List<(int, int, string)> edits, List<string> missing, string key, (int Start, int End)? span, string[] patterns, bool changed)
    {
        if (!changed)
        {
            return;
        }

        var array = $"[{string.Join(", ", patterns.Select(p => JsonSerializer.Serialize(p, SnippetJsonContext.Default.String)))}]";
        if (span is { } s)
        {
            edits.Add((s.Start, s.End - s.Start, array));
        }
        else
        {
            missing.Add($"\"{key}\": {array}");
        }
    }

    private static int Chars(byte[] bytes, int byteOffset) => Encoding.UTF8.GetCharCount(bytes, 0, byteOffset);

    private static void Collect(MetadataReader reader, CustomAttributeHandleCollection attributes, string typeName, string member, List<(string, string, bool)> found)
    {
        foreach (var handle in attributes)
        {
            var attribute = reader.GetCustomAttribute(handle);
            var name = AttributeTypeName(reader, attribute);
            var include = name == $"{Namespace}.{nameof(PromoteCallsAttribute)}";
            if (!include && name != $"{Namespace}.{nameof(NeverPromoteAttribute)}")
            {
                continue;
            }

            var value = attribute.DecodeValue(new StringOnlyTypes());
            var pattern = value.FixedArguments is [{ Value: string given }] ? given : $"{typeName}.{member}*";
            found.Add(($"{typeName}.{member}", pattern, include));
        }
    }

    private static string AttributeTypeName(MetadataReader reader, CustomAttribute attribute)
    {
        var parent = attribute.Constructor.Kind switch
        {
            HandleKind.MemberReference => reader.GetMemberReference((MemberReferenceHandle)attribute.Constructor).Parent,
            HandleKind.MethodDefinition => reader.GetMethodDefinition((MethodDefinitionHandle)attribute.Constructor).GetDeclaringType(),
            _ => default,
        };
        return parent.Kind switch
        {
            HandleKind.TypeReference => reader.GetTypeReference((TypeReferenceHandle)parent) is var r ? $"{reader.GetString(r.Namespace)}.{reader.GetString(r.Name)}" : "",
            HandleKind.TypeDefinition => FullName(reader, reader.GetTypeDefinition((TypeDefinitionHandle)parent)),
            _ => "",
        };
    }

    private static string FullName(MetadataReader reader, TypeDefinition type)
    {
        var name = reader.GetString(type.Name);
        if (type.GetDeclaringType() is { IsNil: false } outer)
        {
            return $"{FullName(reader, reader.GetTypeDefinition(outer))}.{name}";
        }

        var ns = reader.GetString(type.Namespace);
        return ns.Length == 0 ? name : $"{ns}.{name}";
    }

    private static string Describe(Exception e) => e switch
    {
        BadImageFormatException => $"not a .NET assembly or damaged: {e.Message}",
        _ => e.Message,
    };

    /// <summary>Enough of a type provider to decode the attributes' one optional string argument.</summary>
    private sealed class StringOnlyTypes : ICustomAttributeTypeProvider<string>
    {
        public string GetPrimitiveType(PrimitiveTypeCode typeCode) => typeCode.ToString();

        public string GetSystemType() => "System.Type";

        public string GetSZArrayType(string elementType) => $"{elementType}[]";

        public string GetTypeFromDefinition(MetadataReader reader, TypeDefinitionHandle handle, byte rawTypeKind) => FullName(reader, reader.GetTypeDefinition(handle));

        public string GetTypeFromReference(MetadataReader reader, TypeReferenceHandle handle, byte rawTypeKind) => reader.GetString(reader.GetTypeReference(handle).Name);

        public string GetTypeFromSerializedName(string name) => name;

        public PrimitiveTypeCode GetUnderlyingEnumType(string type) =>
            throw new BadImageFormatException($"unexpected enum argument of type {type} in an Optpoline attribute.");

        public bool IsSystemType(string type) => type == "System.Type";
    }
}

/// <summary>What <c>optpoline scan</c> prints: the sites section of a config file.</summary>
internal sealed record SitesSnippet(SitesPatterns Sites);

/// <summary>The two pattern lists.</summary>
internal sealed record SitesPatterns(IReadOnlyList<string> Include, IReadOnlyList<string> Exclude);

[System.Text.Json.Serialization.JsonSourceGenerationOptions(PropertyNamingPolicy = System.Text.Json.Serialization.JsonKnownNamingPolicy.CamelCase, WriteIndented = true)]
[System.Text.Json.Serialization.JsonSerializable(typeof(SitesSnippet))]
[System.Text.Json.Serialization.JsonSerializable(typeof(string))]
internal sealed partial class SnippetJsonContext : System.Text.Json.Serialization.JsonSerializerContext
{
}
